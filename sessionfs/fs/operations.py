"""``pyfuse3.Operations`` for sessionfs: translate each request into tree and store calls.

No disk I/O happens here: every store call goes through :meth:`Operations._store`,
which runs it in a worker thread against the catalog's current store for that
directory, so a slow fsync of one session never holds up requests for others.
The rules for buffers and commits live in :mod:`.handles`, the inode table in
:mod:`.tree`.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
import pyfuse3
import trio

from ..catalog import Backing, Catalog
from ..entry import DEFAULT_MAX_ENTRY_BYTES
from ..errors import EntryExists, EntryNotFound, InvalidEntry, InvalidKey, NoStore, SessionFSError
from ..keys import NAME_MAX, display_to_key, key_to_display, key_to_filename
from ..store import ABSENT, Commit, EntryChanged, Snapshot, Version
from .cache import ContentCache
from .handles import Handle, is_scratch_name
from .tree import Control, Dir, File, Node, Seen, Tree
from .watcher import OwnChanges, Watcher

log = logging.getLogger("sessionfs")

CONTROL_DIR = ".sessionfs"
READDIR_CHUNK = 256
DEFAULT_SCRATCH_LIMIT = 64 * 1024 * 1024
MAX_REJECTIONS = 100
CONFLICT_LAST_WINS = "lww"
CONFLICT_FAIL = "fail"

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
        started = time.perf_counter()
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
        finally:
            self.seconds[name] += time.perf_counter() - started

    functools.update_wrapper(handler, fn)
    return handler


def _mtime(version: Version | None) -> str:
    if version is None or version == ABSENT:
        return "absent"
    return dt.datetime.fromtimestamp(version.mtime_ns / 1e9, dt.UTC).isoformat(
        timespec="milliseconds"
    )


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
        return f"{stamp.replace('+00:00', 'Z')}  {self.path}  {name}  {self.reason}"


@dataclass(eq=False, slots=True)
class DirHandle:
    """One open directory: the listing taken when it was first read, so offsets hold."""

    node: Dir
    listing: list[tuple[str, Node | None]] | None = None  # (name, node; None for an agent)
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
        scratch_limit: int = DEFAULT_SCRATCH_LIMIT,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        conflict: str = CONFLICT_LAST_WINS,
    ) -> None:
        super().__init__()
        self.catalog = catalog
        self.tree = Tree()
        self.cache_timeout = cache_timeout
        self.debug = debug
        self.limiter = limiter
        self.scratch_limit = scratch_limit
        self.max_entry_bytes = max_entry_bytes
        self.conflict = conflict
        self.own = OwnChanges()  # so the watcher skips the events of our own commits
        self.watcher: Watcher | None = None
        self.mounted = False  # invalidations need a live FUSE session
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_ns = time.time_ns()
        self.counters: collections.Counter[str] = collections.Counter()
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.content = ContentCache()
        self.rejections: collections.deque[Rejection] = collections.deque(maxlen=MAX_REJECTIONS)
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._changing: dict[int, Handle] = {}  # inode -> the handle that changed it last
        self._next_fh = itertools.count(1)
        root = self.tree.root
        root.holds_sessions = not catalog.per_agent
        self.control_dir = self.tree.subdir(root, CONTROL_DIR)
        self.tree.control(self.control_dir, "pid", _render_pid)
        self.tree.control(self.control_dir, "stats", self._render_stats)
        self.tree.control(self.control_dir, "errors", self._render_errors)
        self.tree.control(self.control_dir, "source", self._render_source)

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
        stats: dict[str, object] = {
            "requests": dict(self.counters),
            "request_ms": {name: round(sec * 1e3, 3) for name, sec in self.seconds.items()},
            "inodes": len(self.tree.nodes),
            "open_files": len(self.handles),
            "scratch_bytes": self.tree.scratch_bytes(),
        }
        if self.watcher is not None:
            stats["watcher"] = {
                "invalidations": self.watcher.invalidations,
                "rescans": self.watcher.rescans,
            }
        return orjson.dumps(stats, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"

    @contextlib.contextmanager
    def _own(self, parent: Dir, *keys: str) -> Iterator[None]:
        """Tell the watcher the changes to *keys* inside are ours; withdrawn if they fail."""
        for key in keys:
            self.own.expect(parent.agent_id, key)
        try:
            yield
        except BaseException:
            for key in keys:
                self.own.cancel(parent.agent_id, key)
            raise

    def _render_source(self) -> bytes:
        return f"{self.catalog.source.path}\n".encode()

    def _render_errors(self) -> bytes:
        return "".join(r.line() + "\n" for r in self.rejections).encode()

    def _reject(self, path: str, exc: OSError) -> pyfuse3.FUSEError:
        code = exc.errno or errno.EIO
        self.rejections.append(Rejection(time.time(), path, code, str(exc)))
        log.warning("rejected write to %s: %s", path, exc)
        return pyfuse3.FUSEError(code)

    @staticmethod
    def _dir_path(parent: Dir | None, name: str) -> str:
        """*name* as the user sees it relative to the mountpoint."""
        if parent is not None and parent.agent_id is not None:
            return f"{parent.agent_id}/{name}"
        return name

    def _path(self, node: File) -> str:
        return self._dir_path(node.parent, node.name)

    def _trusted(self, parent: Dir | None) -> bool:
        """Whether the watcher keeps *parent*'s index fresh, so it may answer without disk I/O."""
        return (
            parent is not None
            and self.watcher is not None
            and self.watcher.watches_store(parent.agent_id)
        )

    def _invalidate_attrs(self, ino: int) -> None:
        """Make the kernel ask for *ino*'s attributes again.

        Safe inside a handler, unlike data or entry invalidation: an attribute-only
        notification takes no inode or page lock in the kernel, so it cannot wait
        for the request being handled.
        """
        if not self.mounted:
            return
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel did not know it
                raise

    def _invalidate_entry(self, parent: Dir, name: str) -> None:
        """Make the kernel forget *name* in *parent*; a worker thread does it, so it is
        safe inside a handler."""
        if self.mounted:
            pyfuse3.invalidate_entry_async(parent.ino, name.encode(), ignore_enoent=True)

    def _attrs(self, node: Node, size: int = 0) -> pyfuse3.EntryAttributes:
        """Attributes from what the tree knows (callers learn from the disk first)."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.entry_timeout = attrs.attr_timeout = self.cache_timeout
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        attrs.st_blksize = 4096
        attrs.st_nlink = 1
        mtime_ns = ctime_ns = self.started_ns
        if isinstance(node, Dir):
            attrs.st_mode = stat.S_IFDIR | (0o500 if node is self.control_dir else 0o700)
            attrs.st_nlink = 2
        elif isinstance(node, File):
            attrs.st_mode = stat.S_IFREG | node.mode
            attrs.st_nlink = 1 if node.linked else 0
            mtime_ns, ctime_ns = node.mtime_ns, node.ctime_ns
            if node.is_session and not node.pending and node.seen_version is not None:
                size = node.seen_version.size
            else:  # scratch or pending: lives in memory
                size = len(node.data)
            changing = self._changing.get(node.ino)
            if changing is not None:  # written but not committed yet: show what the writer sees
                size = len(changing.data)
                mtime_ns = ctime_ns = changing.changed_ns
        else:
            attrs.st_mode = stat.S_IFREG | 0o400
        attrs.st_size = size
        attrs.st_blocks = (size + 511) // 512
        attrs.st_atime_ns, attrs.st_mtime_ns, attrs.st_ctime_ns = mtime_ns, mtime_ns, ctime_ns
        return attrs

    def _dir(self, inode: int) -> Dir:
        node = self.tree.nodes.get(inode)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _sessions_dir(self, inode: int) -> Dir:
        """A directory of sessions, where files can be made; EPERM elsewhere."""
        node = self._dir(inode)
        if not node.holds_sessions:
            raise pyfuse3.FUSEError(errno.EPERM)
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

    @staticmethod
    def _key(name: str) -> str:
        """The key a session name stands for; EINVAL for a name that is not a key's spelling."""
        key = display_to_key(name)
        if key is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        key_to_filename(key)  # ENAMETOOLONG when the backing name would not fit
        return key

    async def _find(self, parent: Dir, name: str) -> tuple[Node, os.stat_result | None]:
        """The node *name* stands for in *parent* (and its entry's stat), or ENOENT."""
        child = parent.children.get(name)
        if child is not None:
            return self.tree.nodes[child], None
        if parent is self.tree.root and self.catalog.per_agent:
            if await trio.to_thread.run_sync(self.catalog.has_agent, name, limiter=self.limiter):
                return self.tree.agent_dir(name), None
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not parent.holds_sessions:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if is_scratch_name(name):
            scratch = self.tree.scratch(parent, name)
            if scratch is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return scratch, None
        key = display_to_key(name)
        if key is None or key in parent.away:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.tree.known_session(parent, key)
        if node is not None and node.pending:
            return node, None
        if self._trusted(parent):
            if node is not None and node.present is not None:
                if not node.present:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return node, None
            if node is None and parent.indexed:
                raise pyfuse3.FUSEError(errno.ENOENT)
        st = await self._stat(parent, key, node)
        return self.tree.session(parent, key), st

    async def _stat(self, parent: Dir, key: str, node: File | None) -> os.stat_result:
        """Ask the store for *key*'s stat and learn it; a gone entry is learnt as gone (ENOENT)."""
        stamp = self.tree.bump(parent)
        try:
            st = await self._store(parent, lambda b: b.stat(key))
        except EntryNotFound:
            if node is not None:
                self.tree.learn(node, None, stamp)
            raise
        self.tree.learn(node or self.tree.session(parent, key), Seen.of(st), stamp)
        return st

    async def _find_existing(self, parent: Dir, name: str) -> Node | None:
        """The node *name* stands for, or None if there is none."""
        try:
            node, _ = await self._find(parent, name)
        except (pyfuse3.FUSEError, EntryNotFound):
            return None
        return node

    async def _attrs_of(self, node: Node) -> pyfuse3.EntryAttributes:
        if isinstance(node, File) and node.is_session and not node.pending:
            assert node.parent is not None and node.key is not None
            if self._trusted(node.parent) and node.present is not None:
                if not node.present:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return self._attrs(node)
            await self._stat(node.parent, node.key, node)
            return self._attrs(node)
        if isinstance(node, Control):
            return self._attrs(node, size=len(node.render()))
        return self._attrs(node)

    # -- lookups and attributes ---------------------------------------------

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node, st = await self._find(self._dir(parent_inode), self._text(name))
        # with a stat, _find has just learnt the entry from the disk
        attrs = self._attrs(node) if st is not None else await self._attrs_of(node)
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
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EPERM if isinstance(node, Dir) else errno.EACCES)
        if fields.update_size:
            await self._truncate(
                node, attr.st_size, self.handles.get(fh) if fh is not None else None
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
        return await self._attrs_of(node)

    async def _truncate(self, node: File, size: int, handle: Handle | None) -> None:
        if handle is not None:
            self._change(handle, lambda h: h.truncate(size, self._limit(h, size - len(h.data))))
            return
        if not node.is_session:  # resized in place: handles share a scratch file's bytes
            self._check_scratch_room(size - len(node.data))
            Handle(0, node, os.O_WRONLY, node.data).truncate(size, self.scratch_limit)
            return
        # truncate(2) on a path: read, resize and commit in one go
        assert node.key is not None and node.parent is not None
        key = node.key
        snap: Snapshot = await self._store(node.parent, lambda b: b.read(key))
        scratch = Handle(0, node, os.O_WRONLY, snap.data, snap.version, key=key)
        scratch.truncate(size, self.max_entry_bytes)
        await self._commit(scratch)

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

    async def _index(self, parent: Dir) -> None:
        """Learn every entry of *parent*'s store in one pass (names and stats, one thread hop).

        With a watcher on the store the result stays true (``indexed``); without
        one, it serves this listing only.
        """
        start = self.tree.bump(parent)

        def scan(backing: Backing) -> list[tuple[str, Seen]]:
            # Compact as it goes: 100,000 stat_results at once would cost ~60 MB.
            keys, found = list(backing.keys()), []
            for first in range(0, len(keys), 1024):
                chunk = keys[first : first + 1024]
                found += [
                    (k, Seen.of(st))
                    for k, st in zip(chunk, backing.stat_many(chunk), strict=True)
                    if st
                ]
            return found

        found = await self._store(parent, scan)
        stored = set()
        for key, seen in found:
            stored.add(key)
            node = self.tree.session(parent, key)
            if not node.pending:
                self.tree.learn(node, seen, start)  # the watcher may know better already
        for key, ino in parent.sessions.items():
            known = self.tree.nodes.get(ino)
            if isinstance(known, File) and key not in stored and not known.pending:
                self.tree.learn(known, None, start)
        parent.indexed = self._trusted(parent)

    async def _listing(self, node: Dir) -> list[tuple[str, Node | None]]:
        names: list[tuple[str, Node | None]] = [
            (name, self.tree.nodes[ino]) for name, ino in node.children.items()
        ]
        if node is self.tree.root and self.catalog.per_agent:
            agents = await trio.to_thread.run_sync(self.catalog.agents, limiter=self.limiter)
            names += [(agent, None) for agent in agents]
        if node.holds_sessions:
            if not (node.indexed and self._trusted(node)):
                await self._index(node)
            for key, ino in node.sessions.items():
                file = self.tree.nodes.get(ino)
                if (
                    isinstance(file, File)
                    and (file.present or file.pending)
                    and key not in node.away
                ):
                    names.append((file.name, file))
            names += [(name, self.tree.nodes[ino]) for name, ino in node.scratch.items()]
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
            name, node = listing[position]
            position += 1
            if node is None:  # an agent: it may have gone since the listing
                try:
                    found, _ = await self._find(handle.node, name)
                except (pyfuse3.FUSEError, EntryNotFound):
                    continue
                node = found
                attrs = await self._attrs_of(node)
            elif isinstance(node, File) and node.is_session and not node.pending:
                if not node.present:
                    continue  # removed since the listing was taken
                attrs = self._attrs(node)
            else:
                attrs = await self._attrs_of(node)
            if not pyfuse3.readdir_reply(token, name.encode(), attrs, position):
                return
            node.nlookup += 1

    @guarded
    async def releasedir(self, fh: int) -> None:
        del self.dir_handles[fh]

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

    def _new_handle(self, node: Node, flags: int, data: bytes | bytearray, **fields: Any) -> Handle:
        handle = Handle(next(self._next_fh), node, flags, data, **fields)
        self.handles[handle.fh] = handle
        node.open_handles += 1
        return handle

    async def _open_file(self, node: File, flags: int) -> tuple[Handle, bool]:
        """A handle on *node*, and whether the kernel may keep its cached pages."""
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if not node.is_session:
            return self._new_handle(node, flags, node.data), False
        assert node.parent is not None and node.key is not None
        key = node.key
        if node.pending:
            handle = self._new_handle(node, flags, b"", key=key if writable else None)
        else:
            # With a watcher on the store, what we know of this entry is current:
            # a truncating open needs no I/O, nor does reopening a version we hold.
            truncating = writable and bool(flags & os.O_TRUNC)
            known = node.seen_version if self._trusted(node.parent) and node.present else None
            data = b"" if known is None or truncating else self.content.get(node.ino, known)
            if known is None or data is None:
                stamp = self.tree.bump(node.parent)
                snap = await self._store(node.parent, lambda b: b.read(key))
                self.tree.learn(node, Seen.of(snap.stat), stamp)
                self.content.put(node.ino, snap.version, snap.data)
                known, data = snap.version, snap.data
            if writable and node.mode & 0o200 == 0:
                raise pyfuse3.FUSEError(errno.EROFS)
            handle = self._new_handle(
                node,
                flags,
                b"" if truncating else data,
                version=known,
                key=key if writable else None,
            )
        if writable and flags & os.O_TRUNC:
            handle.truncate_at_open()
            self._changing[node.ino] = handle
        keep_cache = (
            not writable and handle.version is not None and node.cached_version == handle.version
        )
        if (
            not keep_cache
            and node.cached_version is not None
            and handle.version != node.cached_version
        ):
            # The kernel may still hold the old size; reads would stop there.
            self._invalidate_attrs(node.ino)
        if not writable and handle.version is not None:
            node.cached_version = handle.version
        return handle, keep_cache

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, Control):
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            handle = self._new_handle(node, flags, node.render())
            return pyfuse3.FileInfo(fh=handle.fh, direct_io=True, keep_cache=False)
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EISDIR)
        handle, keep_cache = await self._open_file(node, flags)
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=keep_cache)

    @guarded
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._sessions_dir(parent_inode)
        text = self._text(name)
        existing = await self._find_existing(parent, text)
        if existing is not None:
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if not isinstance(existing, File):
                raise pyfuse3.FUSEError(errno.EISDIR)
            node = existing
            handle, _ = await self._open_file(node, flags)
        elif is_scratch_name(text):
            node = self.tree.new_scratch(parent, text, stat.S_IMODE(mode) & ~ctx.umask & 0o777)
            handle = self._new_handle(node, flags, node.data)
        else:
            node = self.tree.new_pending(parent, self._key(text))
            handle = self._new_handle(node, flags, b"", key=node.key)
        node.nlookup += 1
        return pyfuse3.FileInfo(fh=handle.fh), await self._attrs_of(node)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        node = handle.node
        if isinstance(node, File) and node.is_session:
            self.counters["read(session data)"] += 1  # what the kernel's page cache did not answer
        if isinstance(node, File) and handle.version != node.cached_version and not handle.writable:
            # Pages of another version are entering the cache: make the next open drop it.
            node.cached_version = None
        return bytes(handle.data[off : off + size])

    def _limit(self, handle: Handle, growth: int) -> int:
        """How large *handle*'s data may grow: the entry cap, or the scratch budget."""
        if handle.key is not None:
            return self.max_entry_bytes
        self._check_scratch_room(growth)
        return self.scratch_limit

    def _check_scratch_room(self, growth: int) -> None:
        if growth > 0 and self.tree.scratch_bytes() + growth > self.scratch_limit:
            log.warning(
                "scratch files would exceed %d bytes in memory; refused (ENOSPC)",
                self.scratch_limit,
            )
            raise pyfuse3.FUSEError(errno.ENOSPC)

    def _change(self, handle: Handle, change: Callable[[Handle], object]) -> None:
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            change(handle)
        except InvalidEntry as exc:
            assert isinstance(handle.node, File)
            raise self._reject(self._path(handle.node), exc) from None
        if handle.key is not None:
            self._changing[handle.node.ino] = handle

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        growth = max(0, off + len(buf) - len(handle.data))
        self._change(handle, lambda h: h.write(off, buf, self._limit(h, growth)))
        return len(buf)

    async def _commit(self, handle: Handle) -> None:
        """Validate and atomically store what *handle* wrote; errors reach the caller."""
        node = handle.node
        assert isinstance(node, File) and handle.key is not None
        if node.key != handle.key or not node.linked or node.parent is None:
            # Unlinked or renamed since it was opened: like writing to an unlinked file.
            handle.dirty = False
            return
        parent, key, data = node.parent, handle.key, bytes(handle.data)
        opened = handle.version
        expected = (opened or ABSENT) if self.conflict == CONFLICT_FAIL else None
        try:
            with self._own(parent, key):
                commit = await self._store(parent, lambda b: b.write(key, data, expected=expected))
        except EntryChanged as exc:
            handle.dirty = False
            reason = (
                f"changed behind the mount since it was opened (mtime {_mtime(exc.expected)}, "
                f"now {_mtime(exc.current)}); the outside version stays (-o conflict=fail)"
            )
            raise self._reject(
                self._path(node), SessionFSError(reason, code=errno.ESTALE)
            ) from None
        except (SessionFSError, OSError) as exc:
            handle.dirty = False  # reported once; the next change tries again
            raise self._reject(self._path(node), exc) from None
        finally:
            if self._changing.get(node.ino) is handle:
                del self._changing[node.ino]
        if commit.replaced != opened:
            log.warning(
                "conflict on %s: it changed behind the mount since it was opened (mtime %s, "
                "then %s); this later commit wins",
                self._path(node),
                _mtime(opened),
                _mtime(commit.replaced),
            )
        handle.committed(commit.version)
        self._committed(parent, node, commit, data)
        self._invalidate_attrs(node.ino)
        log.debug("committed %s (%d bytes)", self._path(node), len(data))

    def _committed(self, parent: Dir, node: File, commit: Commit, data: bytes) -> None:
        """What every commit to *node*'s key leaves behind in the tree."""
        self.tree.remember(node, Seen.of(commit.stat), self.tree.bump(parent))
        self.content.put(node.ino, commit.version, data)
        node.pending = False
        node.cached_version = None
        assert node.key is not None
        parent.away.pop(node.key, None)  # written anew: a backup of it is only a backup now

    @guarded
    async def flush(self, fh: int) -> None:
        handle = self.handles[fh]
        if handle.error is not None:
            error, handle.error, handle.dirty = handle.error, None, False
            raise pyfuse3.FUSEError(error.errno or errno.EIO)
        if handle.should_commit(final=False):
            await self._commit(handle)

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        # Every commit is durable (fsync of the file and the directory), so a
        # clean handle has nothing left to do; answering ENOSYS instead would make
        # the kernel report success for all later fsyncs without asking.
        await self.flush(fh)

    @guarded
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        node = handle.node
        try:
            if handle.should_commit(final=True):
                await self._commit(handle)
        except pyfuse3.FUSEError:
            pass  # release cannot report errors; _commit logged and listed this one
        finally:
            if self._changing.get(node.ino) is handle:
                del self._changing[node.ino]
            if isinstance(node, File) and node.pending and handle.wrote and node.parent is not None:
                # A new file whose content was refused never existed; an empty one
                # (`touch new.json`) stays until it is written or removed.
                assert node.key is not None
                self.tree.unlink(node.parent, node.name, node.key)
                self._invalidate_entry(node.parent, node.name)
            self.tree.release(node)

    # -- unlink and rename ---------------------------------------------------

    async def _forget_backup(self, parent: Dir, backup: File) -> None:
        """*backup* held a session renamed away and nothing replaced it: the user removes it."""
        key, version = backup.origin_key, backup.origin_version
        if key is None or parent.away.get(key) != backup.ino:
            return
        del parent.away[key]
        with self._own(parent, key):
            removed = await self._store(
                parent, lambda b: b.delete(key, only_if=lambda s: s.version == version)
            )
        if not removed:
            self.own.cancel(parent.agent_id, key)
        if removed:
            log.info("removed session %r: its last copy, %s, was removed", key, backup.name)
        else:
            log.info("kept session %r: it changed after it was renamed to %s", key, backup.name)

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._sessions_dir(parent_inode)
        text = self._text(name)
        if is_scratch_name(text):
            node = self.tree.unlink(parent, text)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            await self._forget_backup(parent, node)
            return
        key = display_to_key(text)
        if key is None or key in parent.away:
            raise pyfuse3.FUSEError(errno.ENOENT)
        known = self.tree.nodes.get(parent.sessions.get(key, 0))
        if not (isinstance(known, File) and known.pending):
            with self._own(parent, key):
                await self._store(parent, lambda b: b.delete(key))
            log.info("removed session %s", self._dir_path(parent, text))
        self.tree.unlink(parent, text, key)

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
        old, new = self._text(name_old), self._text(name_new)
        source, _ = await self._find(parent, old)
        assert isinstance(source, File)
        if old == new:
            return
        if flags & pyfuse3.RENAME_NOREPLACE and await self._find_existing(parent, new) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if is_scratch_name(new):
            await self._rename_to_scratch(parent, source, new)
        elif source.is_session and not source.pending:
            await self._rename_session(parent, source, self._key(new), flags)
        else:
            await self._rename_to_session(parent, source, new, self._key(new))

    async def _rename_to_scratch(self, parent: Dir, source: File, new: str) -> None:
        if source.is_session and not source.pending:
            # An editor's backup (vim, emacs): the entry stays in the store while
            # the new version is written; it goes only if the backup is removed
            # without the key coming back (see _forget_backup).
            assert source.key is not None
            key = source.key
            snap = await self._store(parent, lambda b: b.read(key))
            self.tree.move(source, parent, new, None)
            source.data = bytearray(snap.data)
            source.mode, source.mtime_ns, source.ctime_ns = (
                0o600,
                snap.stat.st_mtime_ns,
                snap.stat.st_ctime_ns,
            )
            source.origin_key, source.origin_version = key, snap.version
            parent.away[key] = source.ino
            return
        source.pending = False
        self.tree.move(source, parent, new, None)

    async def _rename_session(self, parent: Dir, source: File, key: str, flags: int) -> None:
        assert source.key is not None
        old_key = source.key
        try:
            with self._own(parent, old_key, key):
                await self._store(
                    parent,
                    lambda b: b.rename(old_key, key, replace=not flags & pyfuse3.RENAME_NOREPLACE),
                )
        except EntryExists:
            raise pyfuse3.FUSEError(errno.EEXIST) from None
        self.tree.move(source, parent, key_to_display(key), key)
        source.stamp = self.tree.bump(parent)  # a rename keeps the entry's file and version
        parent.away.pop(key, None)
        log.info("renamed session %r to %r", old_key, key)

    async def _rename_to_session(self, parent: Dir, source: File, new: str, key: str) -> None:
        """A scratch file (``sed -i``, ``jq > t && mv t f``) or a pending file becomes a session."""
        data = bytes(source.data)
        try:
            with self._own(parent, key):
                commit = await self._store(parent, lambda b: b.write(key, data))
        except (InvalidEntry, InvalidKey, OSError) as exc:
            where = self._dir_path(parent, new)
            raise self._reject(f"{where} (renamed from {source.name})", exc) from None
        origin_key, origin_ino = source.origin_key, source.ino
        self.tree.move(source, parent, new, key)
        source.data = b""  # the content lives in the store now
        source.origin_key = source.origin_version = None
        self._committed(parent, source, commit, data)
        if (
            origin_key is not None
            and origin_key != key
            and parent.away.get(origin_key) == origin_ino
        ):
            # a backup of another session, renamed to this key: that session moved here
            del parent.away[origin_key]
            with self._own(parent, origin_key):
                await self._store(parent, lambda b: b.delete(origin_key))
        log.info("committed %s (%d bytes, renamed into place)", self._path(source), len(data))
