"""The mount's virtual tree: inode numbers, directories, files and control files.

Inode numbers belong to files as the kernel sees them, not to backing files: every
atomic commit puts a new backing inode in place, but editors compare ``st_ino``
before and after a save, so a session keeps its number across commits and outside
changes.  A rename moves a file's number with it, as on any filesystem (the kernel
moves its own dentry the same way), and a number is never given to anything else.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

from ..keys import key_to_display
from ..store import Version


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


@dataclass(eq=False, slots=True)
class File(Node):
    """A session (``key`` set) or a scratch file of an editor or tool (``key`` None).

    A scratch file lives in ``data`` and never reaches the store.  A session's
    content lives in the store, except while ``pending``: created through the
    mount but not committed yet (``touch new.json``).
    """

    parent: Dir | None = None
    name: str = ""
    key: str | None = None
    pending: bool = False
    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o600
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)
    linked: bool = True
    # The version whose bytes the kernel's page cache may hold; None when
    # unknown, which makes the next open drop the cache.
    cached_version: Version | None = None
    # The version whose attributes the kernel was last given (for rescans).
    seen_version: Version | None = None
    # A scratch file that a session was renamed to (an editor's backup): the key
    # it came from, and the version it held then.
    origin_key: str | None = None
    origin_version: Version | None = None

    @property
    def is_session(self) -> bool:
        return self.key is not None


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
        new = File(next(self._next_ino), parent=parent, name=key_to_display(key), key=key)
        parent.sessions[key] = new.ino
        self._add(new)
        return new

    def scratch(self, parent: Dir, name: str) -> File | None:
        ino = parent.scratch.get(name)
        return None if ino is None else self._file(ino)

    def new_scratch(self, parent: Dir, name: str, mode: int = 0o600) -> File:
        self.unlink(parent, name)
        new = File(next(self._next_ino), parent=parent, name=name, mode=mode)
        parent.scratch[name] = new.ino
        self._add(new)
        self.scratch_files.add(new)
        return new

    def new_pending(self, parent: Dir, key: str) -> File:
        """A new session created through the mount, shown but not committed yet."""
        self.unlink(parent, key_to_display(key), key)
        node = self.session(parent, key)
        node.pending = True
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
        elif old_parent.scratch.get(node.name) == node.ino:
            del old_parent.scratch[node.name]
        self.unlink(parent, name, key)
        node.parent, node.name, node.key, node.linked = parent, name, key, True
        if key is not None:
            parent.sessions[key] = node.ino
            self.scratch_files.discard(node)
        else:
            parent.scratch[name] = node.ino
            self.scratch_files.add(node)

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
            node.data = bytearray()
            self.scratch_files.discard(node)
            if not node.nlookup:
                self.nodes.pop(node.ino, None)

    def scratch_bytes(self) -> int:
        return sum(len(f.data) for f in self.scratch_files)
