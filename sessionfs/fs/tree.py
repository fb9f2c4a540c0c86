"""The mount's virtual tree: inode numbers, directories, files and control files.

Inode numbers belong to files as the kernel sees them, not to backing files: every
atomic commit puts a new backing inode in place, but editors compare ``st_ino``
before and after a save, so a session keeps its number across commits and outside
changes.  A rename moves a file's number with it, as on any filesystem (the kernel
moves its own dentry the same way), and a number is never given to anything else.

What the store holds for each key (:class:`Known`) is kept per directory by key,
not on the nodes: a node is what the kernel holds a reference to, and it can be
unlinked or renamed while knowledge of its old key must survive (a gateway may
write that key a moment later).  :mod:`.index` is the only writer of that
knowledge; this module only stores it.
"""

from __future__ import annotations

import itertools
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pyfuse3

from ..keys import key_to_display
from ..store import Version

CONTROL_MODE = 0o500


@dataclass(frozen=True, slots=True)
class Seen:
    """What a stat of an entry tells the mount, without the rest of a stat_result."""

    version: Version
    ctime_ns: int
    writable: bool

    @classmethod
    def of(cls, st: os.stat_result) -> Seen:
        return cls(Version.of(st), st.st_ctime_ns, bool(stat.S_IMODE(st.st_mode) & 0o200))


@dataclass(slots=True)
class Known:
    """The store's state of one key as last learnt: its entry's version, or None when absent.

    ``stamp`` is the directory generation the knowledge was taken at (see
    :meth:`.index.Index.learn`).  One object per key, updated in place: a mount of
    100,000 sessions keeps 100,000 of them.
    """

    stamp: int
    version: Version | None
    ctime_ns: int = 0
    writable: bool = True

    @classmethod
    def of(cls, stamp: int, st: os.stat_result) -> Known:
        writable = bool(stat.S_IMODE(st.st_mode) & 0o200)
        return cls(stamp, Version.of(st), st.st_ctime_ns, writable)

    def set(self, stamp: int, seen: Seen | None) -> None:
        self.stamp = stamp
        if seen is None:
            self.version = None
        else:
            self.version, self.ctime_ns, self.writable = seen.version, seen.ctime_ns, seen.writable

    def seen(self) -> Seen | None:
        """The entry as a value (what an unlinked file keeps showing)."""
        if self.version is None:
            return None
        return Seen(self.version, self.ctime_ns, self.writable)


Entry = Seen | Known
"""A committed entry as the mount shows it: version, ctime and whether it is writable."""


@dataclass(frozen=True, slots=True)
class Owner:
    """Who owns what the mount shows, and how long the kernel may cache it."""

    uid: int
    gid: int
    timeout: float
    started_ns: int

    @classmethod
    def current(cls, timeout: float, uid: int | None = None, gid: int | None = None) -> Owner:
        """The daemon's user and group, or *uid*/*gid* (``-o uid=,gid=``)."""
        return cls(
            os.getuid() if uid is None else uid,
            os.getgid() if gid is None else gid,
            timeout,
            time.time_ns(),
        )


def _attributes(
    owner: Owner, ino: int, mode: int, size: int, nlink: int, mtime_ns: int, ctime_ns: int
) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = ino
    attrs.entry_timeout = attrs.attr_timeout = owner.timeout
    attrs.st_uid, attrs.st_gid = owner.uid, owner.gid
    attrs.st_blksize = 4096
    attrs.st_mode = mode
    attrs.st_nlink = nlink
    attrs.st_size = size
    attrs.st_blocks = (size + 511) // 512
    attrs.st_atime_ns = attrs.st_mtime_ns = mtime_ns
    attrs.st_ctime_ns = ctime_ns
    return attrs


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    nlookup: int = 0  # the kernel's references (lookup +1, forget -N)
    open_handles: int = 0

    def attributes(self, owner: Owner) -> pyfuse3.EntryAttributes:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class HistoryPlace:
    """What a directory under ``.sessionfs/history/`` lists (see :mod:`.history_view`)."""

    agent_id: str | None  # whose store (None: the mount's single store, or the top)
    file_name: str | None = None  # set: one key's kept versions (its entry file name)
    agents: bool = False  # the top of a state-dir mount: one directory per agent


@dataclass(eq=False, slots=True)
class Dir(Node):
    """The root, an agent's directory, the control directory, or one of the history's."""

    name: str = ""
    parent: Dir | None = None
    holds_sessions: bool = False
    history: HistoryPlace | None = None
    agent_id: str | None = None  # None with holds_sessions: the mount's single store
    mode: int = 0o700
    sessions: dict[str, int] = field(default_factory=dict)  # key -> inode of its file
    scratch: dict[str, int] = field(default_factory=dict)  # scratch name -> inode
    # keys renamed to a scratch name (an editor's backup) -> that file's inode:
    # hidden under their own name while the editor writes the new version
    away: dict[str, int] = field(default_factory=dict)
    children: dict[str, int] = field(default_factory=dict)  # control dir, control files
    # What the store holds, by key (see Known).  With ``complete`` set, a key
    # missing here is absent from the store (the watcher keeps this current).
    known: dict[str, Known] = field(default_factory=dict)
    complete: bool = False
    epoch: int = 0  # counts losses of events; a listing that saw one stays partial
    generation: int = 0
    gone: set[str] = field(default_factory=set)  # keys that went, to forget (index._sweep)
    transcripts: dict[str, int] = field(default_factory=dict)  # key -> its transcript's inode
    # key -> (the entry version it was read from, its transcript's file name or None)
    transcript_names: dict[str, tuple[Version, str | None]] = field(default_factory=dict)

    def attributes(self, owner: Owner) -> pyfuse3.EntryAttributes:
        started = owner.started_ns
        return _attributes(owner, self.ino, stat.S_IFDIR | self.mode, 0, 2, started, started)

    def present(self, key: str) -> Known | None:
        """What is known of *key*, if the store holds an entry for it."""
        known = self.known.get(key)
        return None if known is None or known.version is None else known


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
    mode: int = 0o600  # scratch and pending files; a session's comes from its entry
    mtime_ns: int = 0
    ctime_ns: int = 0
    linked: bool = True
    # The entry as it was when this node was unlinked (``rm`` while open: fstat
    # still answers), or None.
    last_seen: Seen | None = None
    # A scratch file that a session was renamed to (an editor's backup): the key
    # it came from, and the version it held then.
    origin_key: str | None = None
    origin_version: Version | None = None
    # When (time.monotonic_ns) attributes were last given to the kernel while the file
    # was open (the kernel keeps them: a commit after that must tell it they went stale)
    attributes_given_ns: int = 0

    @property
    def is_session(self) -> bool:
        return self.key is not None

    @property
    def name(self) -> str:
        # Derived, not stored: a mount of 100,000 sessions would keep 100,000 copies.
        return key_to_display(self.key) if self.key is not None else self.scratch_name

    def shown(self) -> Seen | None:
        """The committed entry this file shows (or last showed), as a value that will not change."""
        entry = self.entry()
        if entry is None:
            return self.last_seen  # its entry went behind the mount: what it showed then
        return entry.seen() if isinstance(entry, Known) else entry

    def entry(self) -> Entry | None:
        """The committed entry this file shows, or None (pending, scratch, or gone)."""
        if self.key is None or self.pending:
            return None
        if not self.linked or self.parent is None:
            return self.last_seen
        known = self.parent.known.get(self.key)
        return None if known is None or known.version is None else known

    def _given_to_kernel(self) -> None:
        """These attributes go to the kernel, which keeps them (see attributes_given_ns)."""
        if self.open_handles:
            self.attributes_given_ns = time.monotonic_ns()

    def stands_in(self) -> Known | None:
        """While an editor saves a session it renamed to a backup (the store still holds
        it there), the new file, pending until its close, shows that committed version:
        a reader meanwhile gets the entry the gateway reads, not an empty file."""
        if not self.pending or self.parent is None or self.key not in self.parent.away:
            return None
        known = self.parent.known.get(self.key)
        return known if known is not None and known.version is not None else None

    def attributes(self, owner: Owner) -> pyfuse3.EntryAttributes:
        """What ``stat`` shows: a session's committed entry, never uncommitted bytes."""
        seen: Entry | None = self.entry()
        if seen is None:
            seen = self.stands_in()
        if seen is not None:
            return self.entry_attributes(owner, seen)
        self._given_to_kernel()
        nlink = 1 if self.linked else 0
        size = 0 if self.key is not None else len(self.data)
        return _attributes(
            owner, self.ino, stat.S_IFREG | self.mode, size, nlink, self.mtime_ns, self.ctime_ns
        )

    def entry_attributes(self, owner: Owner, seen: Entry) -> pyfuse3.EntryAttributes:
        """The attributes of a session whose committed entry is *seen*."""
        version = seen.version
        assert version is not None
        self._given_to_kernel()
        return _attributes(
            owner,
            self.ino,
            stat.S_IFREG | (0o600 if seen.writable else 0o400),
            version.size,
            1 if self.linked else 0,
            version.mtime_ns,
            seen.ctime_ns,
        )


@dataclass(eq=False, slots=True)
class Control(Node):
    """A read-only file under ``.sessionfs/`` whose content is computed when read."""

    name: str = ""
    render: Callable[[], bytes] = lambda: b""
    # content that needs the disk: read when opened (in a worker thread); size 0 in
    # stat, as /proc's files (reads on a direct_io handle go to the end regardless)
    load: Callable[[], Awaitable[bytes]] | None = None

    def attributes(self, owner: Owner) -> pyfuse3.EntryAttributes:
        started = owner.started_ns
        size = 0 if self.load is not None else len(self.render())
        return _attributes(owner, self.ino, stat.S_IFREG | 0o400, size, 1, started, started)


@dataclass(eq=False, slots=True)
class KeptVersion(Node):
    """A version of an entry kept in ``.history/``, shown read-only; its bytes never change."""

    parent: Dir | None = None
    name: str = ""  # "<time it stopped being current>.json"
    size: int = 0
    mtime_ns: int = 0  # when it was written

    def attributes(self, owner: Owner) -> pyfuse3.EntryAttributes:
        return _attributes(
            owner, self.ino, stat.S_IFREG | 0o400, self.size, 1, self.mtime_ns, self.mtime_ns
        )


@dataclass(eq=False, slots=True)
class Transcript(Node):
    """``<key>.jsonl``: the read-only transcript of a session's current ``sessionId``.

    One node per key and transcript file: the number stays while the session's
    transcript does, and a reset (a new ``sessionId``) makes a new file.
    """

    parent: Dir | None = None
    key: str = ""
    file_name: str = ""  # the transcript's name in the sessions dir (SQLite: session id)
    backing_ino: int = 0  # the inode of that file when it was found
    size: int = 0  # readable bytes (whole lines) when last looked at
    mtime_ns: int = 0
    ctime_ns: int = 0
    linked: bool = True

    @property
    def name(self) -> str:
        return key_to_display(self.key) + "l"  # "<key>.json" + "l"

    def attributes(self, owner: Owner) -> pyfuse3.EntryAttributes:
        return _attributes(
            owner,
            self.ino,
            stat.S_IFREG | 0o400,
            self.size,
            1 if self.linked else 0,
            self.mtime_ns,
            self.ctime_ns,
        )

    def saw(self, st: os.stat_result, size: int) -> None:
        self.size, self.mtime_ns, self.ctime_ns = size, st.st_mtime_ns, st.st_ctime_ns


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

    def subdir(self, parent: Dir, name: str, mode: int = CONTROL_MODE) -> Dir:
        """A fixed directory under *parent* (the control directory)."""
        node = Dir(next(self._next_ino), name=name, parent=parent, mode=mode)
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

    def session_dirs(self) -> Iterator[Dir]:
        if self.root.holds_sessions:
            yield self.root
        yield from self.agent_dirs.values()

    def control(
        self,
        parent: Dir,
        name: str,
        render: Callable[[], bytes],
        load: Callable[[], Awaitable[bytes]] | None = None,
    ) -> Control:
        node = Control(next(self._next_ino), name=name, render=render, load=load)
        parent.children[name] = node.ino
        self._add(node)
        return node

    # -- sessions and scratch files --------------------------------------------

    def session(self, parent: Dir, key: str) -> File:
        """The file of *key* in *parent*; the same node until it is unlinked or renamed."""
        ino = parent.sessions.get(key)
        if ino is not None:
            return self.nodes[ino]  # type: ignore[return-value]  # sessions map to files
        new = File(next(self._next_ino), parent=parent, key=key)
        parent.sessions[key] = new.ino
        self._add(new)
        return new

    def transcript(self, parent: Dir, key: str, file_name: str, backing_ino: int) -> Transcript:
        """The transcript file of *key*; a new one when the session's transcript changed
        (a reset names another file; a file replaced by rename is another inode, so
        ``tail -F`` reopens it, and an open handle keeps reading the one it opened)."""
        ino = parent.transcripts.get(key)
        if ino is not None:
            node = self.nodes[ino]
            assert isinstance(node, Transcript)
            if node.file_name == file_name and node.backing_ino == backing_ino:
                return node
            self.unlink_transcript(parent, key)
        new = Transcript(
            next(self._next_ino),
            parent=parent,
            key=key,
            file_name=file_name,
            backing_ino=backing_ino,
        )
        parent.transcripts[key] = new.ino
        self._add(new)
        return new

    def unlink_transcript(self, parent: Dir, key: str) -> None:
        ino = parent.transcripts.pop(key, None)
        node = None if ino is None else self.nodes.get(ino)
        if isinstance(node, Transcript):
            node.linked = False
            self._maybe_drop(node)

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
        old = self.known_session(parent, key)
        self.unlink(
            parent, key_to_display(key), key, last_seen=None if old is None else old.shown()
        )
        node = self.session(parent, key)
        node.pending = True
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return node

    def _file(self, ino: int) -> File:
        node = self.nodes[ino]
        assert isinstance(node, File)
        return node

    def unlink(
        self,
        parent: Dir,
        name: str,
        key: str | None = None,
        *,
        last_seen: Seen | None = None,
    ) -> File | None:
        """Take *name* (the scratch name, or the session *key*) out of *parent*.

        *last_seen* is the entry the file showed before it went (its open handles'
        ``fstat`` keeps showing it); by then the index may know the key's next state.
        """
        ino = parent.sessions.pop(key, None) if key is not None else parent.scratch.pop(name, None)
        if ino is None:
            return None
        node = self._file(ino)
        node.last_seen = last_seen
        node.linked = False
        node.pending = False
        self._maybe_drop(node)
        return node

    def move(
        self,
        node: File,
        parent: Dir,
        name: str,
        key: str | None,
        *,
        replaced_seen: Seen | None = None,
    ) -> None:
        """Put *node* at *name* (session *key*, or scratch if None), replacing what is there.

        *replaced_seen* is the entry the replaced file showed (see :meth:`unlink`).
        """
        assert node.parent is not None
        old_parent = node.parent
        if node.key is not None:
            if old_parent.sessions.get(node.key) == node.ino:
                del old_parent.sessions[node.key]
        elif old_parent.scratch.get(node.scratch_name) == node.ino:
            del old_parent.scratch[node.scratch_name]
        self.unlink(parent, name, key, last_seen=replaced_seen)
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

    # -- the kernel's references ---------------------------------------------

    def forget(self, ino: int, count: int) -> Node | None:
        node = self.nodes.get(ino)
        if node is None:
            return None
        node.nlookup = max(0, node.nlookup - count)
        self._maybe_drop(node)
        return node

    def drop_session(self, node: File) -> bool:
        """Drop a linked session's node that nothing refers to; whether it was dropped."""
        if node.nlookup or node.open_handles or node.pending:
            return False
        assert node.parent is not None and node.key is not None and node.linked
        del node.parent.sessions[node.key]
        del self.nodes[node.ino]
        node.linked = False
        return True

    def release(self, node: Node) -> None:
        node.open_handles -= 1
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        # An unlinked file goes once the kernel and every handle let go; a linked
        # session stays, so its key keeps its number while the kernel forgets it.
        # History views are made again when looked up: forgotten, they go.
        if isinstance(node, KeptVersion | Dir) and _made_on_demand(node):
            self.nodes.pop(node.ino, None)
            parent = node.parent
            if parent is not None and parent.children.get(node.name) == node.ino:
                del parent.children[node.name]
                self._maybe_drop(parent)
            return
        if isinstance(node, Transcript) and not node.linked:
            if not node.open_handles and not node.nlookup:
                self.nodes.pop(node.ino, None)
            return
        if isinstance(node, File) and not node.linked and not node.open_handles:
            # Unreachable content: free it now, even if the kernel still holds the inode.
            node.data = b""
            self.scratch_files.discard(node)
            if not node.nlookup:
                self.nodes.pop(node.ino, None)

    def sweep_history(self, directory: Dir) -> None:
        """Drop *directory*'s children under ``.sessionfs/history/`` that the kernel does
        not know: a listing makes a node per name, and replies only as many as fit."""
        if directory.history is None:
            return
        for ino in list(directory.children.values()):
            node = self.nodes.get(ino)
            if node is not None:
                self._maybe_drop(node)

    def history_child(self, parent: Dir, name: str, make: Callable[[int], Node]) -> Node:
        """*parent*'s child *name* under ``.sessionfs/history/``, made by *make* (given
        its new inode number) unless it exists; one node per name while the kernel
        knows it."""
        ino = parent.children.get(name)
        if ino is not None:
            return self.nodes[ino]
        node = make(next(self._next_ino))
        parent.children[name] = node.ino
        self._add(node)
        return node

    def scratch_bytes(self) -> int:
        return sum(len(f.data) for f in self.scratch_files)

    def check(self) -> None:
        """Invariants of the tree; tests call this after every operation."""
        for parent in self.session_dirs():
            for key, ino in parent.sessions.items():
                node = self.nodes.get(ino)
                assert isinstance(node, File), f"{key!r} maps to a missing inode {ino}"
                assert node.key == key and node.parent is parent and node.linked, key
            for name, ino in parent.scratch.items():
                node = self.nodes.get(ino)
                assert isinstance(node, File) and node.key is None, name
                assert node.scratch_name == name and node.parent is parent and node.linked
                assert node in self.scratch_files, name
            for key, ino in parent.away.items():
                # while its grace period ends, a removed backup may have left the tree
                backup = self.nodes.get(ino)
                assert backup is None or isinstance(backup, File), key
                assert key not in parent.sessions or self._file(parent.sessions[key]).pending, key
            for key, known in parent.known.items():
                assert known.stamp <= parent.generation, key
        for file in self.scratch_files:
            assert file.key is None


def _made_on_demand(node: Node) -> bool:
    """Whether *node* is made when looked up under ``.sessionfs/history/`` (not its top),
    and can go once nothing refers to it."""
    if isinstance(node, KeptVersion):
        return not node.open_handles and not node.nlookup
    place = node.history if isinstance(node, Dir) else None
    return (
        isinstance(node, Dir)
        and place is not None
        and (place.file_name is not None or place.agent_id is not None)
        and not node.nlookup
        and not node.children
    )
