"""Grace periods: a session that went away through the mount, kept so a failed save can undo it.

Editors and tools replace a file in two steps: vim and emacs rename it to a backup
name and write a new one; ``install``, ``tar -x`` and ``git checkout`` unlink it and
create a new one.  Between the steps the session is gone, and if the new content
is refused, it must come back.  So the version that went away is kept in a
:class:`Grace` record for a short while (2 s: an editor's save takes
milliseconds):

* a new file of the key starts from that version (no conflict with it), and may
  write exactly its bytes back even if they would not pass validation today;
* if the new file is refused or abandoned, the version comes back
  (:meth:`GracePeriods.undo`): a renamed-away session was never removed from the
  store and only shows again; an unlinked one is written back, with its mtime;
* when the period ends without the key coming back, the removal is final: a
  session renamed away is removed from the store then, unless it changed
  meanwhile (so the mount and the store agree); an unlinked one already was.

A crash inside a grace period leaves the store as it was before the rename (the
session stays) or after the unlink (it is gone): never a partial entry.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..catalog import Backing
from ..errors import EntryNotFound, LockBusy, describe_error
from ..history import Actor
from ..maintain import archive_transcripts_of
from ..store import ABSENT, EntryChanged, SessionStore, Snapshot, Version
from .backings import Backings
from .index import Index
from .kernel import Kernel
from .tree import Dir, File, Tree


def _daemon() -> Actor:
    """Who the audit names for what a grace period's end does on the mount's behalf
    (asked at the time: the daemon forks after this module is imported)."""
    return Actor.this_process("sessionfs")


log = logging.getLogger("sessionfs")

GRACE_SECONDS = 2.0


def user_path(parent: Dir | None, name: str) -> str:
    """*name* (a file name or a key) as the user sees it relative to the mountpoint."""
    if parent is not None and parent.agent_id is not None:
        return f"{parent.agent_id}/{name}"
    return name


@dataclass(eq=False, slots=True)
class Grace:
    """A session that went away through the mount, kept so a failed save can bring it back."""

    parent: Dir
    key: str
    snapshot: Snapshot  # the version that went away
    deadline: float
    backup: File | None  # renamed to this scratch file (the store still holds it); None: unlinked
    # A write of the key through the mount began: the store's version may be the
    # snapshot's (an identical write changes nothing) and yet it must not be
    # removed.  Read by the removal's worker thread, under the key's lock.
    claimed: bool = False
    finishing: bool = False
    removed: bool = False  # its end removed the renamed-away session; only the archive is left


class GracePeriods:
    """Every grace record of the mount, and the task that ends them."""

    def __init__(
        self,
        tree: Tree,
        index: Index,
        backings: Backings,
        kernel: Kernel,
        *,
        seconds: float = GRACE_SECONDS,
        lock_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tree = tree
        self.index = index
        self.backings = backings
        self.kernel = kernel
        self.seconds = seconds
        self.lock_timeout = lock_timeout
        self.clock = clock
        self.records: dict[tuple[int, str], Grace] = {}
        self._added = trio.Event()

    def __len__(self) -> int:
        return len(self.records)

    # -- starting and ending ---------------------------------------------------

    def renamed_away(self, parent: Dir, key: str, snapshot: Snapshot, backup: File) -> None:
        """*key* was renamed to the scratch file *backup*; the store still holds it."""
        self._start(Grace(parent, key, snapshot, self._deadline(), backup))
        parent.away[key] = backup.ino

    def removed(self, parent: Dir, key: str, snapshot: Snapshot) -> None:
        """*key* was unlinked; *snapshot* is the version that went."""
        self._start(Grace(parent, key, snapshot, self._deadline(), None))

    def claim(self, parent: Dir, key: str) -> None:
        """A write of *key* through the mount is about to start: never remove it now."""
        grace = self.records.get((parent.ino, key))
        if grace is not None:
            grace.claimed = True

    def end(self, parent: Dir, key: str) -> None:
        """*key* was written anew: a backup of it is only a backup now."""
        self._drop(self.records.pop((parent.ino, key), None))

    def _start(self, grace: Grace) -> None:
        ident = (grace.parent.ino, grace.key)
        self._drop(self.records.pop(ident, None))
        self.records[ident] = grace
        self._added.set()

    def _drop(self, grace: Grace | None) -> None:
        backup = None if grace is None else grace.backup
        if (
            grace is not None
            and backup is not None
            and grace.parent.away.get(grace.key) == backup.ino
        ):
            del grace.parent.away[grace.key]
            self.index.forget_gone(grace.parent, grace.key)

    def _deadline(self) -> float:
        return self.clock() + self.seconds

    # -- what a new file of the key may do ------------------------------------

    def replaced_version(self, parent: Dir, key: str) -> Version | None:
        """The version a new file of *key* replaces: a backup's, while an editor saves."""
        grace = self.records.get((parent.ino, key))
        if grace is not None and grace.backup is not None:
            return grace.snapshot.version  # the store still holds it
        return None

    def went_recently(self, parent: Dir, key: str) -> bool:
        """Whether *key* went (unlinked, or renamed to a backup) within its grace period."""
        return (parent.ino, key) in self.records

    def holds(self, parent: Dir, key: str, data: bytes) -> bool:
        """Whether *data* is exactly the version of *key* that just went away."""
        grace = self.records.get((parent.ino, key))
        return grace is not None and grace.snapshot.data == data

    def of_backup(self, node: File) -> Grace | None:
        """The record of the session *node* is the renamed-away copy of, if it is one."""
        if node.origin_key is None or node.parent is None:
            return None
        grace = self.records.get((node.parent.ino, node.origin_key))
        return grace if grace is not None and grace.backup is node else None

    # -- undo and finish -------------------------------------------------------

    async def undo(self, parent: Dir, key: str) -> bool:
        """Bring back what went away of *key*, if anything did within its grace period.

        Runs with the key's operations serialized, so it never overlaps the
        record's own end; if writing an unlinked version back fails, the record
        stays (its period ends as usual) and the log says so.
        """
        deadline = trio.current_time() + self.lock_timeout
        async with self.backings.serialized(parent.agent_id, (key,), deadline):
            grace = self.records.get((parent.ino, key))
            if grace is None or grace.finishing:
                return False
            grace.claimed = True
            snap = grace.snapshot
            if grace.backup is None:
                try:
                    await self.index.write(
                        parent,
                        key,
                        lambda b: b.write(
                            key,
                            snap.data,
                            validate=False,
                            expected=ABSENT,
                            mtime_ns=snap.stat.st_mtime_ns,
                            lock_wait=0,
                            actor=_daemon(),
                            op="restored: its replacement was refused",
                        ),
                        deadline=deadline,
                    )
                except EntryChanged:
                    pass  # written meanwhile by someone else: that version stays
                except OSError as exc:
                    log.error(
                        "could not bring back session %s (%s); it stays removed",
                        user_path(parent, key),
                        exc,
                    )
                    return False
            del self.records[(parent.ino, key)]
            self._drop(grace)
            await self.index.stat(parent, key)
        log.info("kept session %s: its replacement was refused", user_path(parent, key))
        return True

    async def conclude(self, grace: Grace) -> None:
        """End *grace* now (its period is over, or its backup was removed or moved).

        A failure is logged and leaves the session in the store: a background
        task must never end the mount, and keeping is the safe side.
        """
        if self.records.get((grace.parent.ino, grace.key)) is not grace or grace.finishing:
            return
        grace.finishing = True
        await self._end(grace)

    async def _end(self, grace: Grace) -> None:
        """The body of :meth:`conclude`, for a *grace* its caller marked ``finishing``."""
        ident = (grace.parent.ino, grace.key)
        ended = False
        try:
            deadline = trio.current_time() + self.lock_timeout
            async with self.backings.serialized(grace.parent.agent_id, (grace.key,), deadline):
                if self.records.get(ident) is grace:  # not ended while this waited its turn
                    await self._finish(grace)
            ended = True
        except Exception as exc:  # any store error: keep the session, report, go on
            if not (isinstance(exc, LockBusy) and self.backings.stopping):
                ended = True
                log.error(
                    "could not end the grace period of %s (%s); the session stays in the store",
                    user_path(grace.parent, grace.key),
                    exc,
                )
            # else the mount ends while this waited for the key: kept for keep_all()
        finally:
            if ended:
                if self.records.get(ident) is grace:
                    del self.records[ident]
                self._drop(grace)
            else:  # cancelled (the mount ends): the record stays for keep_all()
                grace.finishing = False

    async def expire(self, nursery: trio.Nursery | None = None) -> None:
        """End every grace period that is over (a new file still being written gets longer).

        With *nursery*, each ends in a task of its own there, not awaited: one key
        whose lock another process holds (for up to the lock timeout) must not hold
        up the end of every other grace period behind it.
        """
        now = self.clock()
        for grace in list(self.records.values()):
            if grace.deadline > now or grace.finishing:
                continue
            writer = self.tree.known_session(grace.parent, grace.key)
            if writer is not None and writer.pending and writer.open_handles:
                grace.deadline = self._deadline()
                continue
            if nursery is None:
                await self.conclude(grace)
            else:
                grace.finishing = True  # its task ends it; nobody else starts to meanwhile
                nursery.start_soon(self._end_in_task, grace)

    async def _end_in_task(self, grace: Grace) -> None:
        if self.records.get((grace.parent.ino, grace.key)) is not grace:
            return  # ended before the task ran (a new record of the key is not this one's)
        try:
            await self._end(grace)
        except Exception:  # never expected (_end guards its store calls)
            log.exception("internal error while ending a grace period")

    async def _finish(self, grace: Grace) -> None:
        """The session did not come back: the removal is final.

        The record and the backup's hold on the name stay until the removal is
        done, so a lookup meanwhile cannot bring the name back, and a write that
        starts meanwhile (:meth:`claim`) keeps the session.
        """
        parent, key, version = grace.parent, grace.key, grace.snapshot.version
        if grace.backup is None:
            log.debug("removal of %s is final", user_path(parent, key))
            await self.backings.run(parent.agent_id, "archive", self._archiver(grace))
            return
        removed = False
        try:
            await self.index.remove(
                parent,
                key,
                lambda b: b.remove(
                    key,
                    only_if=lambda s: not grace.claimed and s.version == version,
                    lock_wait=0,
                    actor=_daemon(),
                    op="removed: renamed away and not written anew",
                ),
                deadline=trio.current_time() + self.lock_timeout,
            )
            removed = grace.removed = True
        except (EntryNotFound, EntryChanged):
            pass  # gone already, written anew, or changed behind the mount: not ours to remove
        self._drop(grace)
        where, backup = user_path(parent, key), grace.backup.name
        if removed:
            node = self.tree.known_session(parent, key)
            if node is not None and not node.pending:
                self.kernel.forget_name(parent.ino, node.name)
            elif node is not None:  # a new file still pending showed the version removed
                self.kernel.forget_attributes(node.ino)
            log.info("removed session %s: renamed to %s and not written anew", where, backup)
            await self.backings.run(parent.agent_id, "archive", self._archiver(grace))
        else:
            await self.index.stat(parent, key)
            log.info("kept session %s: it changed after it was renamed to %s", where, backup)

    async def run(self) -> None:
        """Background task: end grace periods when they are due, each in its own task."""
        async with trio.open_nursery() as nursery:
            while True:
                deadline = min(
                    (g.deadline for g in self.records.values() if not g.finishing),
                    default=math.inf,
                )
                with trio.move_on_after(max(0.0, deadline - self.clock())):
                    await self._added.wait()
                self._added = trio.Event()
                try:
                    await self.expire(nursery)
                except Exception:  # never expected (conclude guards each); never fatal either
                    log.exception("internal error while ending grace periods; will retry")

    @staticmethod
    def _archiver(grace: Grace) -> Callable[[Backing], None]:
        """Archive the transcripts of *grace*'s session, whose removal is final, as
        maintenance would (unless another entry references them); never raises."""

        def archive(backing: Backing) -> None:
            where = user_path(grace.parent, grace.key)
            if not isinstance(backing, SessionStore):
                return
            try:
                archived = archive_transcripts_of(backing, grace.snapshot.data)
            except OSError as exc:
                log.warning(
                    "could not archive the transcript of removed session %s: %s",
                    where,
                    describe_error(exc),
                )
                return
            for name in archived:
                log.info("archived transcript %s of removed session %s", name, where)

        return archive

    def keep_all(self) -> None:
        """The mount ends: sessions renamed away stay in the store (nothing is lost);
        the transcripts of unlinked ones, whose removal is final, are archived."""
        for grace in self.records.values():
            if grace.backup is not None and not grace.removed:
                log.info(
                    "kept session %s: the mount ended within its grace period",
                    user_path(grace.parent, grace.key),
                )
                continue
            # (the store may have gone: then there is nothing to archive in)
            with (
                contextlib.suppress(OSError),
                self.backings.catalog.backing(grace.parent.agent_id) as backing,
            ):
                self._archiver(grace)(backing)
        self.records.clear()
