"""What the daemon knows about each entry, and the rules that keep it true.

This module is the one owner of the mount's knowledge of the store: for every key
of every directory, whether the store holds an entry and which committed version
(:class:`~.tree.Known`), whether that knowledge is kept current by the watcher
(*trusted*), and the order in which knowledge taken at different moments is
applied.  Commits, renames and unlinks through the mount, listings, lookups and
the watcher all learn through :meth:`Index.learn`.

Coherence, and why it holds
===========================

**Readers see committed versions only.**  A session file is opened with
``direct_io``.  The kernel's rules (``fs/fuse/file.c``) leave no other choice:
the page cache and ``i_size`` belong to the inode and are shared by every open
of it; a writer's ``O_TRUNC`` open (atomic O_TRUNC, on in libfuse 3.14) sets
``i_size`` to 0 for everyone; a cached read stops at that shared size, and pages
filled through one open are served to all.  So with cached reads, a reader that
opened version A reads it with the size of version B (truncated, or padded with
NUL), or gets pages another open filled.  A ``direct_io`` read ignores ``i_size``
and carries its file handle, and the daemon answers it from the bytes that handle
took at open: always exactly one committed version, up to its end.  The cost is
a round trip per ``read`` (and shared writable ``mmap`` is refused); a reopened
unchanged session still needs no disk I/O (:mod:`.cache`).

**``stat`` shows committed versions only.**  Attributes come from this index,
never from a handle's uncommitted buffer; after every commit, refusal or outside
change the kernel is told to ask again (:mod:`.kernel`), so a refused write or
truncate leaves the old entry's size, not the one the kernel computed itself.

**Knowledge is ordered by when it was taken, not when it arrives.**  Every piece
of knowledge carries a *stamp*, a per-directory counter taken *before* the I/O
that produced it (the stat, the read, the commit, the listing).  :meth:`learn`
ignores knowledge older than what it holds for the key.  The watcher takes its
stamp after reading an inotify event and before its stat, so the last change to
any entry is always followed by a stat with a larger stamp than every operation
that began before that change: whatever the interleaving of a commit's
continuation, a listing, and the watcher, the final state learnt is the disk's
final state.  (An operation that stamped itself after its I/O, as commits once
did, could overwrite a newer outside version with its own.)

**Own changes are recognised by version, not by counting events.**  The watcher
stats every key an event names and compares the version with what is known.
While an operation of the mount on a key is in flight (:meth:`own`), what the
watcher learns for that key is recorded but the kernel is not told yet; when the
operation ends, it records its own result, and only if the key then holds a
version other than the one the operation produced was there an outside change
to tell the kernel about.  Nothing is consumed, so no outside change can be
mistaken for ours (ext4 reuses inode numbers, but a version is the inode number
*and* the mtime and size of the file that is current).

Knowledge is kept by key, not on nodes: a node can be unlinked or renamed while
the gateway writes its old key a moment later, and that must not be lost.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ..catalog import Backing
from ..errors import EntryNotFound
from ..keys import key_to_display
from ..store import Commit, Snapshot, Version, is_temp_name
from .backings import Backings
from .cache import ContentCache
from .kernel import Kernel
from .tree import Dir, Entry, File, Known, Seen, Tree

SCAN_CHUNK = 1024
OWN_RENAMES = 1024  # own commits whose events the watcher has not read yet, at most
QUICK_STATS = 16  # a refresh of at most this many keys is a quick call (see .quick)
_V = TypeVar("_V")
log = logging.getLogger("sessionfs")


@dataclass(slots=True)
class OwnChange:
    """An operation of the mount on one key, in flight: what it will have made current."""

    parent: Dir
    key: str
    stamp: int
    result: Seen | None = None
    replaced: Version | None = None
    done: bool = False

    def made(self, seen: Seen | None, *, replaced: Version | None = None) -> None:
        """The operation succeeded and left *seen* (None: the key is gone) as current,
        in place of *replaced* (when known: the version it displaced)."""
        self.result, self.replaced, self.done = seen, replaced, True


class Index:
    """The knowledge of every key; see the module docstring for its rules."""

    def __init__(
        self, tree: Tree, backings: Backings, kernel: Kernel, content: ContentCache
    ) -> None:
        self.tree = tree
        self.backings = backings
        self.kernel = kernel
        self.content = content
        self._watched: set[str | None] = set()
        self._busy: collections.Counter[tuple[int, str]] = collections.Counter()
        self._deferred: set[tuple[int, str]] = set()
        self._scans: dict[int, list[set[str]]] = {}  # listings in flight, per directory
        # Stamps of every look at the disk in flight, per directory: a key that went
        # is forgotten only once nothing that began before it went can still report.
        self._inflight: dict[int, set[int]] = {}
        # (agent, temp name) -> key of own commits that left the index exact: the
        # watcher needs no stat for the events of their renames (see own_rename)
        self._own_renames: collections.OrderedDict[tuple[str | None, str], str] = (
            collections.OrderedDict()
        )
        # temp names whose rename the watcher read before anyone registered it (a commit
        # in a worker thread): registering one later would let a file renamed from that
        # name by anyone else pass unlooked at
        self._read_renames: collections.OrderedDict[tuple[str | None, str], None] = (
            collections.OrderedDict()
        )
        self.outside_changes = 0
        self.forgotten = 0  # gone keys whose records and nodes were dropped

    # -- trust -----------------------------------------------------------------

    def watch(self, agent_id: str | None) -> None:
        """The watcher now sees every change of this store."""
        self._watched.add(agent_id)

    def unwatch(self, agent_id: str | None) -> None:
        """Changes of this store may go unseen: every answer asks the disk again."""
        self._watched.discard(agent_id)
        parent = self.dir_of(agent_id)
        if parent is not None:
            self.incomplete(parent)
            # What the kernel cached with long timeouts while it was watched would
            # otherwise stay for up to those timeouts: it must ask again now.
            for key, ino in parent.sessions.items():
                self.kernel.forget_attributes(ino)
                self.kernel.forget_name(parent.ino, key_to_display(key))

    def trusted(self, parent: Dir) -> bool:
        """Whether what is known of *parent*'s keys is current without asking the disk."""
        return parent.holds_sessions and parent.agent_id in self._watched

    def dir_of(self, agent_id: str | None) -> Dir | None:
        return self.tree.root if agent_id is None else self.tree.agent_dirs.get(agent_id)

    # -- the ordering rule -----------------------------------------------------

    @contextlib.contextmanager
    def _looking(self, parent: Dir) -> Iterator[int]:
        """A new stamp for knowledge about to be taken from *parent*'s store; take it first.

        The look is in flight until the context ends (see :meth:`_sweep`).
        """
        parent.generation += 1
        stamp = parent.generation
        flight = self._inflight.setdefault(parent.ino, set())
        flight.add(stamp)
        try:
            yield stamp
        finally:
            flight.discard(stamp)
            if not flight:
                del self._inflight[parent.ino]
            self._sweep(parent)

    def learn(self, parent: Dir, key: str, seen: Seen | None, stamp: int) -> bool:
        """Record that at *stamp*, *key*'s entry was *seen* (None: absent).

        Knowledge older than what is held is ignored.  Returns whether the
        committed version changed (or appeared, or went).
        """
        known = parent.known.get(key)
        if known is None:
            known = parent.known[key] = Known(stamp, None)
            before = None
        elif known.stamp > stamp:
            return False
        else:
            before = known.version
        for touched in self._scans.get(parent.ino, ()):
            touched.add(key)
        was_writable = known.writable
        if seen is None and before is not None:
            node = self.tree.known_session(parent, key)
            if node is not None:
                node.last_seen = known.seen()  # what its open handles keep showing
        known.set(stamp, seen)
        if seen is None:
            parent.gone.add(key)
        changed = before != known.version or (seen is not None and was_writable != seen.writable)
        if seen is not None:
            self._appeared(parent, key)
        return changed

    def _appeared(self, parent: Dir, key: str) -> None:
        """The store holds *key*: a new file of it made through the mount is pending no more."""
        if key not in parent.away:
            node = self.tree.known_session(parent, key)
            if node is not None and node.pending:
                node.pending = False  # the store holds it now, whoever wrote it

    # -- own operations ------------------------------------------------------

    @contextlib.contextmanager
    def own(self, parent: Dir, key: str) -> Iterator[OwnChange]:
        """Mark an operation of the mount on *key* as in flight; stamps it before its I/O."""
        with self._looking(parent) as stamp:
            change = OwnChange(parent, key, stamp)
            ident = (parent.ino, key)
            self._busy[ident] += 1
            try:
                yield change
            finally:
                if change.done:
                    self._learn_own(change)
                self._busy[ident] -= 1
                if not self._busy[ident]:
                    del self._busy[ident]
                    if ident in self._deferred:
                        self._deferred.discard(ident)
                        now = parent.present(key)
                        ours = change.done and _version(now) == _version(change.result)
                        if not ours:
                            self._tell_kernel(parent, key)

    def _learn_own(self, change: OwnChange) -> None:
        """Record what an operation of the mount made current, by the ordering rule,
        with one exception that only the operation can recognise.

        A look that began during the operation has a newer stamp, yet its I/O may
        have run before the operation's rename: a watcher stat of the previous
        update's event does, in any loop of updates.  If it saw exactly the version
        the operation displaced, it is older than the result, which then takes its
        stamp (not a newer one: a look that began later still wins, as the rule
        says).  Anything else learnt meanwhile stands: a newer outside version, or
        a stale look that the watcher's stat of this operation's own event, stamped
        after everything here, corrects.
        """
        parent, key = change.parent, change.key
        known = parent.known.get(key)
        stamp = change.stamp
        if (
            known is not None
            and known.stamp > stamp
            and change.replaced is not None
            and known.version == change.replaced
        ):
            stamp = known.stamp
        self.learn(parent, key, change.result, stamp)

    async def write(
        self,
        parent: Dir,
        key: str,
        write: Callable[[Backing], Commit],
        *,
        deadline: float,
        quick: bool = False,
    ) -> Commit:
        """Commit *key* with *write* (a store write taking the lock with ``lock_wait=0``)
        as an operation of the mount, and learn the version it made.  *quick*: a small
        entry, which :mod:`.quick` may commit."""
        with self.own(parent, key) as change:
            commit = await self.backings.run_locked(
                parent.agent_id, (key,), "write", write, deadline=deadline, quick=quick
            )
            change.made(Seen.of(commit.stat), replaced=commit.replaced)
        if commit.temp is not None:
            self._renamed_into_place(change, commit.temp)
        return commit

    def _renamed_into_place(self, change: OwnChange, temp: str) -> None:
        """An own commit renamed *temp* onto its key.  If the index now holds exactly
        what it made, with no look in flight that began during it (such a look may
        still report the version it replaced), the watcher's stat of that rename's
        event would learn nothing: it may skip it (:meth:`own_rename`).  Any later
        change of the key raises events of its own, which are looked at as ever."""
        parent = change.parent
        if (parent.agent_id, temp) in self._read_renames:
            del self._read_renames[(parent.agent_id, temp)]
            return  # its events were read already
        if (
            not self.trusted(parent)
            or any(stamp > change.stamp for stamp in self._inflight.get(parent.ino, ()))
            or _version(parent.present(change.key)) != _version(change.result)
        ):
            return
        _remember(self._own_renames, (parent.agent_id, temp), change.key)

    def own_rename(self, agent_id: str | None, temp: str) -> str | None:
        """The key an own commit renamed *temp* onto, if its events need no stat; once.

        A temp name is random and used once, so only that rename's event can match.
        """
        key = self._own_renames.pop((agent_id, temp), None)
        if key is None and is_temp_name(temp):
            _remember(self._read_renames, (agent_id, temp), None)
        return key

    async def remove(
        self, parent: Dir, key: str, remove: Callable[[Backing], Snapshot], *, deadline: float
    ) -> Snapshot:
        """Remove *key* with *remove* (as :meth:`write`), and learn that it is gone."""
        with self.own(parent, key) as change:
            removed = await self.backings.run_locked(
                parent.agent_id, (key,), "remove", remove, deadline=deadline
            )
            change.made(None, replaced=removed.version)
        return removed

    def _learned_outside(self, parent: Dir, key: str, seen: Seen | None, stamp: int) -> None:
        if not self.learn(parent, key, seen, stamp):
            return
        if (parent.ino, key) in self._busy:
            self._deferred.add((parent.ino, key))  # decided when the operation ends
            return
        self._tell_kernel(parent, key)

    def _tell_kernel(self, parent: Dir, key: str) -> None:
        self.outside_changes += 1
        node = self.tree.known_session(parent, key)
        if node is None or (node.pending and key not in parent.away):
            return  # the kernel holds nothing of this key (or the mount's new file stands)
        # (a pending file of an editor's save shows the stored version: File.stands_in)
        self.kernel.forget_attributes(node.ino, outside=True)
        if not node.pending and parent.present(key) is None:
            self.kernel.forget_name(parent.ino, node.name)

    # -- knowledge from the disk ---------------------------------------------

    async def entry(self, parent: Dir, key: str) -> Seen | None:
        """The committed entry of *key*: from memory when trusted, else from a stat."""
        if self.trusted(parent):
            known = parent.known.get(key)
            if known is not None:
                return known.seen()
            if parent.complete:
                return None
        return await self.stat(parent, key)

    async def stat(self, parent: Dir, key: str) -> Seen | None:
        """Ask the store about *key*, learn the answer, and return what is known now.

        A change found this way (before the watcher's event of it is read) is told to
        the kernel here, as the watcher would: the watcher's own look then finds
        nothing new, and ``stat`` would keep the old size while reads serve the new.
        """
        with self._looking(parent) as stamp:
            try:
                st = await self.backings.run(parent.agent_id, "stat", lambda b: b.stat(key))
            except EntryNotFound:
                self._learned_outside(parent, key, None, stamp)
            else:
                self._learned_outside(parent, key, Seen.of(st), stamp)
        known = parent.present(key)
        return None if known is None else known.seen()

    async def read(self, parent: Dir, key: str) -> Snapshot:
        """Read *key*'s current version (the bytes an open serves) and learn its stat
        (a change found so is told to the kernel, as in :meth:`stat`)."""
        with self._looking(parent) as stamp:
            try:
                snap = await self.backings.run(parent.agent_id, "read", lambda b: b.read(key))
            except EntryNotFound:
                self._learned_outside(parent, key, None, stamp)
                raise
            self._learned_outside(parent, key, Seen.of(snap.stat), stamp)
            return snap

    async def scan(self, parent: Dir) -> None:
        """Learn every entry of *parent*'s store in one pass (a listing).

        With a watcher on the store the result stays current (``complete``).
        """
        with self._looking(parent) as stamp:
            await self._scan(parent, stamp)

    async def _scan(self, parent: Dir, stamp: int) -> None:
        trusted = self.trusted(parent)

        def scan(store: Backing) -> dict[str, Known]:
            # Build the index's own records as it goes: 100,000 stat_results at
            # once would cost ~60 MB, and any other intermediate object per entry
            # raises the daemon's peak memory for good.
            keys, found = list(store.keys()), {}
            for first in range(0, len(keys), SCAN_CHUNK):
                chunk = keys[first : first + SCAN_CHUNK]
                for key, st in zip(chunk, store.stat_many(chunk), strict=True):
                    if st is not None:
                        found[key] = Known.of(stamp, st)
            return found

        touched: set[str] = set()  # keys learnt by anyone while the listing ran
        scans = self._scans.setdefault(parent.ino, [])
        scans.append(touched)
        epoch = parent.epoch
        try:
            found = await self.backings.run(parent.agent_id, "list", scan)
        finally:
            scans[:] = [other for other in scans if other is not touched]  # by identity
            if not scans:
                del self._scans[parent.ino]
        known = parent.known
        complete = trusted and self.trusted(parent) and parent.epoch == epoch
        for key, record in found.items():
            if key in touched or (parent.ino, key) in self._busy:
                if key not in known:
                    complete = False  # an operation in flight may still fail: ask again later
                continue  # an operation that ended during the listing knows better
            held = known.get(key)
            if held is None:
                known[key] = record  # adopted as it is: the common case, no copy
                self._appeared(parent, key)
            else:
                self._learned_outside(parent, key, record.seen(), stamp)
        for key, held in list(known.items()):
            if key in found or key in touched or (parent.ino, key) in self._busy:
                continue
            if held.version is not None:
                self._learned_outside(parent, key, None, stamp)
        # events lost meanwhile (an overflow, a failed stat, a lost watch) make it partial
        parent.complete = complete

    async def refresh(self, parent: Dir, keys: list[str], *, event: bool = False) -> None:
        """The watcher saw *keys* change: stat them and tell the kernel what differs.

        *event*: an inotify event of a ``sessions.d/`` (a few stats, a quick call).
        """
        with self._looking(parent) as stamp:
            await self._refresh(parent, keys, stamp, quick=event and len(keys) <= QUICK_STATS)

    async def _refresh(
        self, parent: Dir, keys: list[str], stamp: int, *, quick: bool = False
    ) -> None:
        try:
            stats = await self.backings.run(
                parent.agent_id, "stat", lambda b: b.stat_many(keys), quick=quick
            )
        except OSError as exc:
            self._unknown(parent, keys, exc)
            return
        for key, st in zip(keys, stats, strict=True):
            # Whatever the stat says: a version can repeat (ext4 hands a freed inode
            # number straight back, and without fine-grained timestamps three
            # same-sized writes within one clock tick give the first one's mtime)
            self.content.drop((parent.ino, key))
            if st is None and key not in parent.known and parent.complete:
                continue  # a temp or unknown name that came and went
            self._learned_outside(parent, key, None if st is None else Seen.of(st), stamp)

    def _unknown(self, parent: Dir, keys: list[str], exc: OSError) -> None:
        """*keys* could not be looked at: forget what was known, so the next access asks."""
        log.warning(
            "could not look at %d changed session(s) in %s: %s; asking the disk on next access",
            len(keys),
            parent.agent_id or "the store",
            exc,
        )
        self.incomplete(parent)
        for key in keys:
            if (parent.ino, key) not in self._busy:
                parent.known.pop(key, None)
                for touched in self._scans.get(parent.ino, ()):
                    touched.add(key)
                node = self.tree.known_session(parent, key)
                if node is not None:
                    self.kernel.forget_attributes(node.ino)

    @staticmethod
    def incomplete(parent: Dir) -> None:
        """Events of *parent*'s store may have been lost: the next listing reads it all again
        (and a listing in flight does not make it complete)."""
        parent.complete = False
        parent.epoch += 1

    async def rescan(self, parent: Dir) -> None:
        """After lost events: every key known, and every key on disk, is looked at again."""
        self.incomplete(parent)
        await self.refresh(parent, sorted(parent.known))

    # -- memory ------------------------------------------------------------------

    def _sweep(self, parent: Dir) -> None:
        """Forget keys that went, so a mount whose sessions churn does not grow for ever.

        A gone key's record can be dropped once no look at the disk that began
        before it went is still in flight (such a look could report the old
        entry, and with the record gone nothing would say it is stale).
        """
        for key in list(parent.gone):
            parent.gone.discard(key)
            self.forget_gone(parent, key)

    def forget_gone(self, parent: Dir, key: str) -> None:
        """Drop what is kept of *key* if it is gone and nothing refers to it.

        A node the kernel still knows (a lookup count), an open file, a pending
        new file, an operation in flight or a grace period keep it; the kernel's
        ``forget`` and the last ``release`` call this again.  A key that comes
        back later gets a new inode number.
        """
        known = parent.known.get(key)
        if known is None or known.version is not None or key in parent.away:
            return
        flight = self._inflight.get(parent.ino)
        if (parent.ino, key) in self._busy or (flight and min(flight) < known.stamp):
            parent.gone.add(key)  # decided when those end
            return
        node = self.tree.known_session(parent, key)
        if node is not None and not self.tree.drop_session(node):
            return
        del parent.known[key]  # absent and unknown answer the same (entry(), listings)
        parent.transcript_names.pop(key, None)
        self.tree.unlink_transcript(parent, key)
        self.forgotten += 1

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped *count* references to *ino*."""
        node = self.tree.forget(ino, count)
        if isinstance(node, File) and node.linked and node.key is not None:
            assert node.parent is not None
            self.forget_gone(node.parent, node.key)

    def check(self) -> None:
        """Invariants of the index and the tree; tests call this after every operation."""
        self.tree.check()
        for parent in self.tree.session_dirs():
            for key, ino in parent.sessions.items():
                node = self.tree.nodes[ino]
                assert isinstance(node, File)
                if not node.pending and self.trusted(parent) and parent.complete:
                    assert key in parent.known, f"{key!r} has a node but no knowledge"
        assert all(count > 0 for count in self._busy.values())
        assert self._deferred <= set(self._busy), "deferred changes outlived their operation"


def _remember(
    memory: collections.OrderedDict[tuple[str | None, str], _V],
    name: tuple[str | None, str],
    value: _V,
) -> None:
    """Keep *name* in *memory*, which forgets its oldest past :data:`OWN_RENAMES` (one
    whose events were read before, or never come: a lost watch, an overflow)."""
    memory[name] = value
    while len(memory) > OWN_RENAMES:
        memory.popitem(last=False)


def _version(entry: Entry | None) -> Version | None:
    return None if entry is None else entry.version
