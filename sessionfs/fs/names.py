"""What a name in the mount stands for, and what a directory lists.

A directory of sessions holds three kinds of names: a session's (its key with
``.json``), a scratch file's (anything else: editor and tool temporaries, kept in
memory), and nothing else.  The root of a state-dir mount holds one directory
per agent, asked of the disk on every lookup so agents can come and go.
"""

from __future__ import annotations

import errno

import pyfuse3

from ..catalog import Catalog
from ..keys import NAME_MAX, display_to_key, key_to_filename
from .backings import Backings
from .handles import is_scratch_name
from .index import Index
from .tree import Dir, Entry, File, Node, Owner, Tree


def text(name: bytes) -> str:
    """A name from the kernel as text; ENAMETOOLONG or EINVAL (not UTF-8)."""
    if len(name) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None


def session_key(name: str) -> str:
    """The key a session name stands for; EINVAL for a name that is not a key's spelling."""
    key = display_to_key(name)
    if key is None:
        raise pyfuse3.FUSEError(errno.EINVAL)
    key_to_filename(key)  # ENAMETOOLONG when the backing name would not fit
    return key


class Names:
    """Resolves names to nodes and lists directories, asking the index (and the disk)."""

    def __init__(
        self, tree: Tree, index: Index, backings: Backings, catalog: Catalog, owner: Owner
    ) -> None:
        self.tree = tree
        self.index = index
        self.backings = backings
        self.catalog = catalog
        self.owner = owner

    async def find(self, parent: Dir, name: str) -> Node:
        """The node *name* stands for in *parent*, or ENOENT."""
        child = parent.children.get(name)
        if child is not None:
            return self.tree.nodes[child]
        if parent is self.tree.root and self.catalog.per_agent:
            if await self.backings.thread(self.catalog.has_agent, name):
                return self.tree.agent_dir(name)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not parent.holds_sessions:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if is_scratch_name(name):
            scratch = self.tree.scratch(parent, name)
            if scratch is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return scratch
        key = display_to_key(name)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.tree.known_session(parent, key)
        if node is not None and node.pending:
            return node  # created through the mount, not committed yet
        if key in parent.away:
            raise pyfuse3.FUSEError(errno.ENOENT)  # renamed to a backup: not under its name
        if await self.index.entry(parent, key) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.tree.session(parent, key)

    async def find_existing(self, parent: Dir, name: str) -> Node | None:
        """The node *name* stands for, or None if there is none."""
        try:
            return await self.find(parent, name)
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return None

    async def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        """What ``stat`` shows for *node*; ENOENT for a session whose entry went."""
        if isinstance(node, File) and node.is_session and node.linked and not node.pending:
            assert node.parent is not None and node.key is not None
            if await self.index.entry(node.parent, node.key) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
        return self._cacheable(node, node.attributes(self.owner))

    def entry_attributes(self, node: File, seen: Entry) -> pyfuse3.EntryAttributes:
        """What ``stat`` shows for session *node* whose committed entry is *seen*."""
        return self._cacheable(node, node.entry_attributes(self.owner, seen))

    def _cacheable(self, node: Node, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        # Where the watcher cannot follow changes, nothing tells the kernel when
        # its cached names and sizes go stale: it must ask every time.
        parent = node.parent if isinstance(node, File) else None
        if parent is not None and parent.holds_sessions and not self.index.trusted(parent):
            attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    async def listing(self, directory: Dir) -> list[tuple[str, Node | None]]:
        """Every name in *directory* now (None for an agent, resolved when listed)."""
        names: list[tuple[str, Node | None]] = [
            (name, self.tree.nodes[ino]) for name, ino in directory.children.items()
        ]
        if directory is self.tree.root and self.catalog.per_agent:
            agents = await self.backings.thread(self.catalog.agents)
            names += [(agent, None) for agent in agents]
        if directory.holds_sessions:
            if not (directory.complete and self.index.trusted(directory)):
                await self.index.scan(directory)
            away, session = directory.away, self.tree.session
            for key, known in directory.known.items():
                if known.version is not None and key not in away:
                    node = session(directory, key)
                    if not node.pending:
                        names.append((node.name, node))
            for ino in directory.sessions.values():
                file = self.tree.nodes[ino]
                if isinstance(file, File) and file.pending:
                    names.append((file.name, file))
            names += [(name, self.tree.nodes[ino]) for name, ino in directory.scratch.items()]
        return names
