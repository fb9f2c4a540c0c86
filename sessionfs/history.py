"""Every version of an entry that stopped being current, kept so that a change can be undone.

Before an entry of a ``sessions.d/`` is replaced, renamed over or removed through
:class:`~.store.SessionStore` (the mount, ``maintain``, library users), the version
that goes away is kept as ``.history/<file name of the key>/<time>.json``, named by
the time it stopped being current (UTC, sortable).  Keeping it costs one hard link:
the atomic write renames a new file over the name, so the old inode is reachable
only through the history from then on, and nobody opens it by its name again.  A
crash between the link and the rename leaves an extra version, never a lost one.

The gateway's loader skips dot names, so it never sees ``.history/``; the store
lists only ``*.json`` entries, the watcher follows ``sessions.d/`` itself (not its
subdirectories), and fsck counts ``.history`` as sessionfs's own.

Retention: a version is kept while it is among the :data:`KEEP_NEWEST` newest of
its key or younger than :data:`KEEP_SECONDS` (either suffices); older ones go when
the key gets a new version, looked at once a minute per key at most.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import math
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

HISTORY_DIR = ".history"
KEEP_NEWEST = 20
KEEP_SECONDS = 30 * 86400
PRUNE_SLACK = 10  # versions over KEEP_NEWEST before a keep looks at their ages
PRUNE_EVERY_SECONDS = 60.0  # a key's versions are looked at for pruning this rarely
SUFFIX = ".json"


@dataclass(frozen=True)
class Kept:
    """One kept version: its file name in the key's history and when it stopped being current."""

    name: str
    stopped: float  # epoch seconds
    size: int

    @property
    def when(self) -> str:
        return stamp_of(self.stopped)


def stamp_of(epoch: float) -> str:
    """``2026-11-30T06:36:15.123Z``: sortable as text, and readable."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))
    return f"{whole}.{int(epoch * 1000) % 1000:03d}Z"


def _parse_stamp(name: str) -> float | None:
    base = name.removesuffix(SUFFIX).split("~", 1)[0]  # "~2": a second one in that ms
    try:
        whole, millis = base.removesuffix("Z").rsplit(".", 1)
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000
    except ValueError:
        return None


class History:
    """The kept versions of one ``sessions.d/`` (a directory descriptor the store owns)."""

    def __init__(
        self,
        dir_fd: int,
        *,
        clock: Callable[[], float] = time.time,
        keep_newest: int = KEEP_NEWEST,
        keep_seconds: float = KEEP_SECONDS,
    ) -> None:
        self._dir_fd = dir_fd
        self.clock = clock
        self.keep_newest = keep_newest
        self.keep_seconds = keep_seconds
        # when each key was last pruned: a busy key keeps many versions within 30 days,
        # and listing them on every write would make each write cost more than the last
        self._pruned: dict[str, float] = {}

    def keep(self, name: str) -> str | None:
        """Keep the current file *name* (about to be replaced or removed); its kept name.

        The caller holds the key's lock.  A file that cannot be linked (another
        filesystem's rules, a full disk) is not kept, and the change goes on: history
        is a help, never a reason to refuse a write.
        """
        directory = f"{HISTORY_DIR}/{name}"
        now = self.clock()
        base = stamp_of(now)
        try:
            for attempt in range(1, 100):
                kept = f"{base}{SUFFIX}" if attempt == 1 else f"{base}~{attempt}{SUFFIX}"
                try:
                    self._link(name, f"{directory}/{kept}")
                except FileExistsError:
                    continue
                except FileNotFoundError:  # the key's first kept version: make its directory
                    self._mkdir(HISTORY_DIR)
                    self._mkdir(directory)
                    self._link(name, f"{directory}/{kept}")
                if now - self._pruned.get(name, -math.inf) >= PRUNE_EVERY_SECONDS:
                    self._pruned[name] = now
                    self._prune(name, now)
                return kept
        except OSError:
            return None
        return None

    def _link(self, name: str, kept: str) -> None:
        os.link(name, kept, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd, follow_symlinks=False)

    def _mkdir(self, path: str) -> None:
        try:
            os.mkdir(path, 0o700, dir_fd=self._dir_fd)
        except FileExistsError:
            st = os.stat(path, dir_fd=self._dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, f"{path} is not a directory") from None

    def versions(self, name: str) -> list[Kept]:
        """The kept versions of the entry *name*, oldest first."""
        found = []
        try:
            fd = os.open(
                f"{HISTORY_DIR}/{name}",
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self._dir_fd,
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            with os.scandir(fd) as listing:
                for dirent in listing:
                    stopped = _parse_stamp(dirent.name)
                    if stopped is None or not dirent.is_file(follow_symlinks=False):
                        continue
                    size = dirent.stat(follow_symlinks=False).st_size
                    found.append(Kept(dirent.name, stopped, size))
        finally:
            os.close(fd)
        return sorted(found, key=lambda k: (k.stopped, k.name))

    def names(self) -> list[str]:
        """The entry file names that have kept versions (removed keys included)."""
        try:
            fd = os.open(
                HISTORY_DIR,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self._dir_fd,
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            with os.scandir(fd) as listing:
                return sorted(d.name for d in listing if d.is_dir(follow_symlinks=False))
        finally:
            os.close(fd)

    def read(self, name: str, kept: Kept) -> bytes:
        fd = os.open(
            f"{HISTORY_DIR}/{name}/{kept.name}",
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            dir_fd=self._dir_fd,
        )
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError(errno.EINVAL, f"{kept.name} is not a regular file")
            return f.read()

    def _prune(self, name: str, now: float) -> None:
        versions = self.versions(name)
        if len(versions) <= self.keep_newest + PRUNE_SLACK:
            return
        for kept in versions[: -self.keep_newest]:
            if now - kept.stopped > self.keep_seconds:
                self._unlink(name, kept.name)

    def purge(self, name: str) -> int:
        """Remove every kept version of *name* at once (a secret edited out); how many."""
        versions = self.versions(name)
        for kept in versions:
            self._unlink(name, kept.name)
        with contextlib.suppress(OSError):
            os.rmdir(f"{HISTORY_DIR}/{name}", dir_fd=self._dir_fd)
        return len(versions)

    def _unlink(self, name: str, kept: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{HISTORY_DIR}/{name}/{kept}", dir_fd=self._dir_fd)
