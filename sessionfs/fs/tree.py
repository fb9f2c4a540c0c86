"""The mount's virtual tree: inode numbers, directories, sessions, scratch and control files.

Inode numbers belong to names, not to backing files: every atomic commit puts a new
backing inode in place, but editors compare ``st_ino`` before and after a save, so a
key keeps its number for the life of the mount and a number is never given to
anything else.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

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
    sessions: dict[str, int] = field(default_factory=dict)  # key -> inode, kept for life
    scratch: dict[str, int] = field(default_factory=dict)  # scratch name -> inode
    children: dict[str, int] = field(default_factory=dict)  # agent dirs, control files


@dataclass(eq=False, slots=True)
class Session(Node):
    """One session key in one directory, whether or not it exists right now."""

    parent: Dir | None = None
    key: str = ""
    # The version whose bytes the kernel's page cache may hold for this inode;
    # None when unknown, which makes the next open drop the cache.
    cached_version: Version | None = None


@dataclass(eq=False, slots=True)
class Scratch(Node):
    """A temp or backup file of an editor or tool: kept in memory, never in the store."""

    parent: Dir | None = None
    name: str = ""
    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o600
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)
    linked: bool = True  # False once unlinked; open handles keep it alive


@dataclass(eq=False, slots=True)
class Control(Node):
    """A read-only file under ``.sessionfs/`` whose content is computed when opened."""

    name: str = ""
    render: Callable[[], bytes] = lambda: b""


class Tree:
    """Every node of the mount by inode number, and the name -> inode maps."""

    def __init__(self) -> None:
        self._next_ino = itertools.count(pyfuse3.ROOT_INODE + 1)
        self.root = Dir(pyfuse3.ROOT_INODE, name="")
        self.nodes: dict[int, Node] = {self.root.ino: self.root}
        self.agent_dirs: dict[str, Dir] = {}

    def _add(self, node: Node) -> Node:
        self.nodes[node.ino] = node
        return node

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

    def session(self, parent: Dir, key: str) -> Session:
        """The node of *key* in *parent*, the same one for the life of the mount."""
        ino = parent.sessions.get(key)
        if ino is not None:
            node = self.nodes[ino]
            assert isinstance(node, Session)
            return node
        new = Session(next(self._next_ino), parent=parent, key=key)
        parent.sessions[key] = new.ino
        self._add(new)
        return new

    def new_scratch(self, parent: Dir, name: str) -> Scratch:
        """A fresh scratch file (a new inode even when the name was used before)."""
        old = parent.scratch.get(name)
        if old is not None:
            self.unlink_scratch(parent, name)
        new = Scratch(next(self._next_ino), parent=parent, name=name)
        parent.scratch[name] = new.ino
        self._add(new)
        return new

    def unlink_scratch(self, parent: Dir, name: str) -> Scratch:
        node = self.nodes[parent.scratch.pop(name)]
        assert isinstance(node, Scratch)
        node.linked = False
        self._maybe_drop(node)
        return node

    def attach_scratch(self, parent: Dir, name: str, node: Scratch) -> None:
        """Give *node* the scratch name *name* (a rename within the mount)."""
        if name in parent.scratch and parent.scratch[name] != node.ino:
            self.unlink_scratch(parent, name)
        node.parent, node.name, node.linked = parent, name, True
        parent.scratch[name] = node.ino

    def control(self, parent: Dir, name: str, render: Callable[[], bytes]) -> Control:
        node = Control(next(self._next_ino), name=name, render=render)
        parent.children[name] = node.ino
        self._add(node)
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        node.nlookup = max(0, node.nlookup - count)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        # Only scratch files go away: a session's inode must outlive its lookups,
        # since the same key must get the same number when it comes back.
        if (
            isinstance(node, Scratch)
            and not node.linked
            and not node.nlookup
            and not node.open_handles
        ):
            self.nodes.pop(node.ino, None)

    def release(self, node: Node) -> None:
        node.open_handles -= 1
        self._maybe_drop(node)
