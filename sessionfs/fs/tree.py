"""The mount's virtual tree: inode numbers, directories, files and control files.

Inode numbers belong to files as the kernel sees them, not to backing files: every
atomic commit puts a new backing inode in place, but editors compare ``st_ino``
before and after a save, so a session keeps its number across commits and outside
changes.  A rename moves a file's number with it, as on any filesystem (the kernel
moves its own dentry the same way), and a number is never given to anything else.
"""

from __future__ import annotations

import itertools
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

from ..keys import key_to_display
from ..store import Version


@dataclass(frozen=True, slots=True)
class Seen:
    """What a stat of an entry tells the mount, without the rest of a stat_result."""

    version: Version
    ctime_ns: int
    writable: bool

    @classmethod
    def of(cls, st: os.stat_result) -> Seen:
        return cls(Version.of(st), st.st_ctime_ns, bool(stat.S_IMODE(st.st_mode) & 0o200))


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    nlookup: int = 0  # the kernel's references (lookup +1, forget -N)
    open_handles: int = 0


@dataclass(eq=False, slots=True)
class Dir(Node):
    """The root, an agent's directory, or the control directory."""

    name: str = ""
    parent: Dir | None = None
    holds_sessions: bool = False
    agent_id: str | None = None  # None with holds_sessions: the mount's single store
    sessions: dict[str, int] = field(default_factory=dict)  # key -> inode of its file
    scratch: dict[str, int] = field(default_factory=dict)  # scratch name -> inode
    away: dict[str, int] = field(default_factory=dict)  # key renamed to a scratch -> its inode
    children: dict[str, int] = field(default_factory=dict)  # control dir, control files
    # With a watcher on its store, every stored key has a node whose ``present``
    # is kept true; a key without a node is absent.  ``generation`` orders what
    # the disk told us, so a slow listing never overwrites a newer event.
    indexed: bool = False
    generation: int = 0


@dataclass(eq=False, slots=True)
class File(Node):
    """A session (``key`` set) or a scratch file of an editor or tool (``key`` None).

    A scratch file lives in ``data`` and never reaches the store.  A session's
    content lives in the store, except while ``pending``: created through the
    mount but not committed yet (``touch new.json``).
    """

    parent: Dir | None = None
    scratch_name: str = ""  # a session's name is derived from its key (see name)
    key: str | None = None
    pending: bool = False
    # Scratch content (a bytearray that handles share); sessions keep none here.
    data: bytes | bytearray = b""
    mode: int = 0o600
    mtime_ns: int = 0
    ctime_ns: int = 0
    linked: bool = True
    # The version whose bytes the kernel's page cache may hold; None when
    # unknown, which makes the next open drop the cache.
    cached_version: Version | None = None
    # What the store holds for this key, as last seen on disk: present or not
    # (None: not known), and its version; with mode, mtime_ns and ctime_ns it
    # answers lookups and getattr without touching the disk.
    present: bool | None = None
    seen_version: Version | None = None
    stamp: int = 0  # the directory generation this was learnt at
    # A scratch file that a session was renamed to (an editor's backup): the key
    # it came from, and the version it held then.
    origin_key: str | None = None
    origin_version: Version | None = None

    @property
    def is_session(self) -> bool:
        return self.key is not None

    @property
    def name(self) -> str:
        # Derived, not stored: a mount of 100,000 sessions would keep 100,000 copies.
        return key_to_display(self.key) if self.key is not None else self.scratch_name


@dataclass(eq=False, slots=True)
class Control(Node):
    """A read-only file under ``.sessionfs/`` whose content is computed when read."""

    name: str = ""
    render: Callable[[], bytes] = lambda: b""


class Tree:
    """Every node of the mount by inode number, and the name -> inode maps."""

    def __init__(self) -> None:
        self._next_ino = itertools.count(pyfuse3.ROOT_INODE + 1)
        self.root = Dir(pyfuse3.ROOT_INODE, name="")
        self.nodes: dict[int, Node] = {self.root.ino: self.root}
        self.agent_dirs: dict[str, Dir] = {}
        self.scratch_files: set[File] = set()  # for the bound on their total size

    def _add(self, node: Node) -> None:
        self.nodes[node.ino] = node

    def get(self, ino: int) -> Node:
        return self.nodes[ino]

    def subdir(self, parent: Dir, name: str) -> Dir:
        """A fixed directory under *parent* (the control directory)."""
        node = Dir(next(self._next_ino), name=name, parent=parent)
        parent.children[name] = node.ino
        self._add(node)
        return node

    def agent_dir(self, agent_id: str) -> Dir:
        """The directory of *agent_id*, the same one for the life of the mount.

        Agents are not children of the root: whether one exists is asked of the
        disk on every lookup, so agents can come and go.
        """
        node = self.agent_dirs.get(agent_id)
        if node is None:
            node = Dir(
                next(self._next_ino),
                name=agent_id,
                parent=self.root,
                holds_sessions=True,
                agent_id=agent_id,
            )
            self.agent_dirs[agent_id] = node
            self._add(node)
        return node

    def control(self, parent: Dir, name: str, render: Callable[[], bytes]) -> Control:
        node = Control(next(self._next_ino), name=name, render=render)
        parent.children[name] = node.ino
        self._add(node)
        return node

    # -- sessions and scratch files --------------------------------------------

    def session(self, parent: Dir, key: str) -> File:
        """The file of *key* in *parent*; the same node until it is unlinked or renamed."""
        ino = parent.sessions.get(key)
        if ino is not None:
            node = self.nodes[ino]
            assert isinstance(node, File)
            return node
        new = File(next(self._next_ino), parent=parent, key=key)
        parent.sessions[key] = new.ino
        self._add(new)
        return new

    def known_session(self, parent: Dir, key: str) -> File | None:
        """The node of *key* if there is one, without making one."""
        ino = parent.sessions.get(key)
        return None if ino is None else self._file(ino)

    def scratch(self, parent: Dir, name: str) -> File | None:
        ino = parent.scratch.get(name)
        return None if ino is None else self._file(ino)

    def new_scratch(self, parent: Dir, name: str, mode: int = 0o600) -> File:
        self.unlink(parent, name)
        now = time.time_ns()
        new = File(
            next(self._next_ino),
            parent=parent,
            scratch_name=name,
            data=bytearray(),
            mode=mode,
            mtime_ns=now,
            ctime_ns=now,
        )
        parent.scratch[name] = new.ino
        self._add(new)
        self.scratch_files.add(new)
        return new

    def new_pending(self, parent: Dir, key: str) -> File:
        """A new session created through the mount, shown but not committed yet."""
        self.unlink(parent, key_to_display(key), key)
        node = self.session(parent, key)
        node.pending = True
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return node

    def _file(self, ino: int) -> File:
        node = self.nodes[ino]
        assert isinstance(node, File)
        return node

    def unlink(self, parent: Dir, name: str, key: str | None = None) -> File | None:
        """Take *name* (the scratch name, or the session *key*) out of *parent*."""
        ino = parent.sessions.pop(key, None) if key is not None else parent.scratch.pop(name, None)
        if ino is None:
            return None
        node = self._file(ino)
        node.linked = False
        self._maybe_drop(node)
        return node

    def move(self, node: File, parent: Dir, name: str, key: str | None) -> None:
        """Put *node* at *name* (session *key*, or scratch if None), replacing what is there."""
        assert node.parent is not None
        old_parent = node.parent
        if node.key is not None:
            if old_parent.sessions.get(node.key) == node.ino:
                del old_parent.sessions[node.key]
        elif old_parent.scratch.get(node.scratch_name) == node.ino:
            del old_parent.scratch[node.scratch_name]
        self.unlink(parent, name, key)
        node.parent, node.key, node.linked = parent, key, True
        node.scratch_name = "" if key is not None else name
        if key is None and not isinstance(node.data, bytearray):
            node.data = bytearray(node.data)
        if key is not None:
            parent.sessions[key] = node.ino
            self.scratch_files.discard(node)
        else:
            parent.scratch[name] = node.ino
            self.scratch_files.add(node)

    # -- what the store holds ---------------------------------------------------

    @staticmethod
    def bump(parent: Dir) -> int:
        """A new generation of what *parent*'s store is known to hold; take it before the I/O."""
        parent.generation += 1
        return parent.generation

    def learn(self, node: File, seen: Seen | None, stamp: int) -> bool:
        """Record what the disk said at *stamp* (None: the entry is gone).

        Nothing happens if something newer was learnt since *stamp*: a stat that
        raced with a commit or a watcher event must not bring back an older
        version.  Returns whether the version changed or the entry went.
        """
        if node.stamp > stamp:
            return False
        if seen is None:
            return self.forget_entry(node, stamp)
        return self.remember(node, seen, stamp)

    @staticmethod
    def remember(node: File, seen: Seen, stamp: int) -> bool:
        """Record that *node*'s entry exists as *seen*; returns whether its version changed."""
        changed = node.seen_version != seen.version
        node.present, node.seen_version, node.stamp = True, seen.version, stamp
        node.mode = 0o600 if seen.writable else 0o400
        node.mtime_ns, node.ctime_ns = seen.version.mtime_ns, seen.ctime_ns
        return changed

    @staticmethod
    def forget_entry(node: File, stamp: int) -> bool:
        """Record that *node*'s entry is gone; returns whether it was there before."""
        was = bool(node.present)
        node.present, node.seen_version, node.stamp = False, None, stamp
        node.cached_version = None
        return was

    # -- the kernel's references ---------------------------------------------

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        node.nlookup = max(0, node.nlookup - count)
        self._maybe_drop(node)

    def release(self, node: Node) -> None:
        node.open_handles -= 1
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        # An unlinked file goes once the kernel and every handle let go; a linked
        # session stays, so its key keeps its number while the kernel forgets it.
        if isinstance(node, File) and not node.linked and not node.open_handles:
            # Unreachable content: free it now, even if the kernel still holds the inode.
            node.data = b""
            self.scratch_files.discard(node)
            if not node.nlookup:
                self.nodes.pop(node.ino, None)

    def scratch_bytes(self) -> int:
        return sum(len(f.data) for f in self.scratch_files)
