"""What a name in the mount stands for, and what a directory lists.

A directory of sessions holds three kinds of names: a session's (its key with
``.json``), a scratch file's (anything else: editor and tool temporaries, kept in
memory), and nothing else.  The root of a state-dir mount holds one directory
per agent, asked of the disk on every lookup so agents can come and go.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any

import pyfuse3

from ..catalog import Backing, Catalog
from ..errors import InvalidKey
from ..keys import NAME_MAX, display_to_key, key_to_display, key_to_filename
from ..sqlite_view import SqliteView
from ..store import Version
from ..transcripts import parsed, transcript_files, transcript_name, transcript_stat
from .backings import Backings
from .handles import is_scratch_name, is_transcript_name
from .history_view import HistoryView
from .index import Index
from .tree import Dir, Entry, File, KeptVersion, Node, Owner, Transcript, Tree

log = logging.getLogger("sessionfs")

# A name in a listing, its node (None: an agent, resolved when listed) and the key
# it stood for then (None: not a session's file).
Listed = tuple[str, Node | None, str | None]


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


TranscriptName = tuple[Version, str | None]  # the version an entry named its transcript in
_SURELY_FITS = 60  # characters of a key: at most 4 bytes each, its names fit NAME_MAX


class Names:
    """Resolves names to nodes and lists directories, asking the index (and the disk)."""

    def __init__(
        self,
        tree: Tree,
        index: Index,
        backings: Backings,
        catalog: Catalog,
        owner: Owner,
        history: HistoryView,
    ) -> None:
        self.tree = tree
        self.index = index
        self.backings = backings
        self.catalog = catalog
        self.owner = owner
        self.history = history
        self._too_long: set[tuple[int, str]] = set()  # keys whose .jsonl name was too long

    async def find(self, parent: Dir, name: str) -> Node:
        """The node *name* stands for in *parent*, or ENOENT."""
        if parent.history is not None:
            return await self.history.find(parent, name)
        child = parent.children.get(name)
        if child is not None:
            return self.tree.nodes[child]
        if parent is self.tree.root and self.catalog.per_agent:
            if await self.backings.thread(self.catalog.has_agent, name):
                return self.tree.agent_dir(name)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not parent.holds_sessions:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if is_transcript_name(name):
            return await self.transcript(parent, name)
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

    # -- transcripts -----------------------------------------------------------

    async def transcript(self, parent: Dir, name: str) -> Transcript:
        """The ``<key>.jsonl`` file of a session that has a transcript; ENOENT otherwise."""
        key = display_to_key(name[:-1])  # "<key>.jsonl" -> "<key>.json"
        if key is None or key in parent.away or await self.index.entry(parent, key) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        (found,) = await self._transcripts(parent, [key], sized=True)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    def _fits(self, parent: Dir, key: str, suffix: str = "") -> bool:
        """Whether ``<key>.json`` (with *suffix*: ``.jsonl``) is a possible file name.

        A SQLite-era or legacy key has no length limit of its own; one name the
        kernel cannot take would make the whole directory unlistable.  Said once.
        """
        if len(key) <= _SURELY_FITS:
            return True
        try:
            name = key_to_display(key) + suffix
        except InvalidKey:  # its .json name alone is over the limit
            name = key + ".json" + suffix
        else:
            if len(os.fsencode(name)) <= NAME_MAX:
                return True
        if (parent.ino, name) not in self._too_long:
            self._too_long.add((parent.ino, name))
            what = "transcript" if suffix else "entry"
            log.warning(
                "session %r has no %s file in the mount: its name would be over %d bytes",
                key,
                what,
                NAME_MAX,
            )
        return False

    async def _transcripts(
        self, parent: Dir, keys: list[str], *, sized: bool
    ) -> list[Transcript | None]:
        """The transcript files of *keys* (None where a session has none), in one worker call.

        An entry is read for its transcript's name only when its version changed
        since the last look; a SQLite-era agent's transcripts are its events, by
        session id, summed once per database commit for a listing.  With *sized*
        the readable size (whole lines) is taken, else the file's size (listings:
        one ``lstat`` per transcript).
        """
        sessions_dir = self.catalog.sessions_dir(parent.agent_id)
        existing: dict[str, tuple[os.stat_result, int]] | None = None
        if not sized:
            # one listing of the sessions dir instead of a stat per session; without
            # any transcript in it, nothing more is done (no entry read, no loop)
            existing = await self.backings.run(
                parent.agent_id,
                "transcripts",
                lambda b: None if isinstance(b, SqliteView) else transcript_files(sessions_dir),
            )
            if existing is not None and not existing:
                return [None] * len(keys)
        cached = parent.transcript_names
        versions: dict[str, Version | None] = {}
        stale: list[str] = []
        if existing is not None or sized:  # (a database's listing needs no entry's name)
            versions = {key: known.version for key in keys if (known := parent.present(key))}
            stale = [k for k, version in versions.items() if cached.get(k, (None,))[0] != version]

        def look(backing: Backing) -> tuple[dict[str, TranscriptName] | None, list[Any]]:
            """Per key (file name, stat, size) or None; and the names learnt from entries."""
            if isinstance(backing, SqliteView):
                return None, backing.transcript_stats(keys)  # events by session id
            names: dict[str, TranscriptName] = {}
            for key in stale:
                try:
                    snap = backing.read(key)
                except OSError:
                    continue  # gone, or not readable: no transcript shown
                version = versions[key]
                assert version is not None
                names[key] = (version, transcript_name(parsed(snap.data), sessions_dir))
            wanted = [names.get(key, cached.get(key, (None, None)))[1] for key in keys]
            if existing is not None:
                found = [None if name is None else existing.get(name) for name in wanted]
            else:
                found = [
                    None if name is None else transcript_stat(sessions_dir, name, sized=sized)
                    for name in wanted
                ]
            return names, [
                None if seen is None else (name, *seen)
                for name, seen in zip(wanted, found, strict=True)
            ]

        learned, stats = await self.backings.run(parent.agent_id, "transcripts", look)
        if learned is not None:
            cached.update(learned)
        found: list[Transcript | None] = []
        transcript = self.tree.transcript
        for key, seen in zip(keys, stats, strict=True):
            if seen is None:
                found.append(None)
                continue
            file_name, st, size = seen
            node = transcript(parent, key, file_name, st.st_ino)
            node.saw(st, size)
            found.append(node)
        return found

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
        if (
            isinstance(node, Transcript)
            and node.linked
            and node.parent is not None
            # it grows while read: every stat looks again (tail -f polls with fstat)
            and await self.transcript(node.parent, node.name) is not node
        ):
            raise pyfuse3.FUSEError(errno.ENOENT)  # gone, or a reset made a new one
        return self._cacheable(node, node.attributes(self.owner))

    def listed_attributes(self, node: Transcript) -> pyfuse3.EntryAttributes:
        """A transcript's attributes as the listing just saw them (no I/O per name)."""
        attrs = node.attributes(self.owner)
        attrs.entry_timeout = attrs.attr_timeout = 0  # it grows: never cached
        return attrs

    def entry_attributes(self, node: File, seen: Entry) -> pyfuse3.EntryAttributes:
        """What ``stat`` shows for session *node* whose committed entry is *seen*."""
        return self._cacheable(node, node.entry_attributes(self.owner, seen))

    def session_attributes(
        self, directory: Dir
    ) -> Callable[[File, Entry], pyfuse3.EntryAttributes]:
        """:meth:`entry_attributes` for the sessions of *directory*, with what holds for
        all of them decided once: a listing asks it for 10,000 names per ``ls``."""
        owner = self.owner
        untrusted = directory.holds_sessions and not self.index.trusted(directory)

        def attributes(node: File, seen: Entry) -> pyfuse3.EntryAttributes:
            attrs = node.entry_attributes(owner, seen)
            if untrusted:
                attrs.entry_timeout = attrs.attr_timeout = 0
            return attrs

        return attributes

    def _cacheable(self, node: Node, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        # Where the watcher cannot follow changes, nothing tells the kernel when
        # its cached names and sizes go stale: it must ask every time.
        parent = node.parent if isinstance(node, File) else None
        untrusted = parent is not None and parent.holds_sessions and not self.index.trusted(parent)
        if untrusted or isinstance(node, Transcript | KeptVersion) or _history_dir(node):
            attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    async def listing(self, directory: Dir) -> list[Listed]:
        """Every name in *directory* now (node None for an agent, resolved when listed).

        Each session's name is computed once here (a listing of a SQLite-era agent
        asks for 20,000 of them), and carried with its key, so that a reply can
        tell a renamed node by its key alone.
        """
        if directory.history is not None:
            return await self.history.listing(directory)
        names: list[Listed] = [
            (name, self.tree.nodes[ino], None) for name, ino in directory.children.items()
        ]
        if directory is self.tree.root and self.catalog.per_agent:
            agents = await self.backings.thread(self.catalog.agents)
            names += [(agent, None, None) for agent in agents]
        if directory.holds_sessions:
            if not (directory.complete and self.index.trusted(directory)):
                await self.index.scan(directory)
            away, session, fits = directory.away, self.tree.session, self._fits
            shown: dict[str, str] = {}  # key -> its name, for the transcripts
            for key, known in directory.known.items():
                if (
                    known.version is not None
                    and key not in away
                    and (len(key) <= _SURELY_FITS or fits(directory, key))
                ):
                    node = session(directory, key)
                    name = shown[key] = key_to_display(key)
                    if not node.pending:  # (a pending one is listed below)
                        names.append((name, node, key))
            for ino in directory.sessions.values():
                file = self.tree.nodes[ino]
                if isinstance(file, File) and file.pending:
                    names.append((file.name, file, file.key))
            names += [(name, self.tree.nodes[ino], None) for name, ino in directory.scratch.items()]
            present = [k for k in shown if len(k) <= _SURELY_FITS or fits(directory, k, "l")]
            transcripts = await self._transcripts(directory, present, sized=False)
            names += [
                (shown[key] + "l", t, key)
                for key, t in zip(present, transcripts, strict=True)
                if t is not None
            ]
        return names


def _history_dir(node: Node) -> bool:
    """A directory under ``.sessionfs/history/``: its content changes with every commit."""
    return isinstance(node, Dir) and node.history is not None
