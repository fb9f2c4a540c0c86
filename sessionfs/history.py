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
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from .owners import adopt

log = logging.getLogger("sessionfs")

HISTORY_DIR = ".history"
KEEP_NEWEST = 20
KEEP_SECONDS = 30 * 86400
PRUNE_SLACK = 10  # versions over KEEP_NEWEST before a keep looks at their ages
PRUNE_EVERY_SECONDS = 60.0  # a key's versions are looked at for pruning this rarely
SUFFIX = ".json"


@dataclass(frozen=True, slots=True)
class Retention:
    """How long versions are kept: the *keep_newest* newest of each key, or any younger
    than *keep_seconds* (either suffices); *enabled* false keeps none (``--no-history``)."""

    keep_newest: int = KEEP_NEWEST
    keep_seconds: float = KEEP_SECONDS
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.keep_newest < 0 or self.keep_seconds < 0:
            raise ValueError("history retention must not be negative")


@dataclass(frozen=True)
class Kept:
    """One kept version: its file name in the key's history and when it stopped being current."""

    name: str
    stopped: float  # epoch seconds
    size: int
    began: float  # its mtime: when it was written, so when it became current
    ino: int = 0  # (versions can share an inode: disk usage counts it once)

    @property
    def when(self) -> str:
        return stamp_of(self.stopped)


def stamp_of(epoch: float) -> str:
    """``2026-11-30T06:36:15.123Z``: sortable as text, and readable."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))
    return f"{whole}.{int(epoch * 1000) % 1000:03d}Z"


_STAMP_NAME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z(~\d\d)?" + re.escape(SUFFIX))


def _parse_stamp(name: str) -> float | None:
    base = name.removesuffix(SUFFIX).split("~", 1)[0]  # "~2": a second one in that ms
    try:
        whole, millis = base.removesuffix("Z").rsplit(".", 1)
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000
    except ValueError:
        return None


AUDIT_FILE = "audit.jsonl"
AUDIT_OLDER = "audit.1.jsonl"  # the previous audit file, once the current one grew too big
AUDIT_MAX_BYTES = 4 << 20  # so the audit of one store takes at most ~8 MiB
# Lines are appended in batches at most this often (and when a store closes; the
# daemon flushes every few seconds): each append dirties a data block that the next
# commit's fsync must write too (ext4 data=ordered), +13% on every update if per line.
AUDIT_FLUSH_SECONDS = 1.0
AUDIT_FLUSH_LINES = 256


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: the process behind a request to the mount, or this one."""

    uid: int
    pid: int
    program: str

    @classmethod
    def of_process(cls, pid: int, uid: int) -> Actor:
        """The process *pid* (a FUSE request's caller), its name read now: it may exit
        before the change it asked for is committed."""
        # os.open/os.read: every write through the mount asks, and a buffered file
        # object costs three times as much as the read itself
        try:
            fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return cls(uid, pid, "?")  # exited already, or another pid namespace's
        try:
            program = os.read(fd, 64).decode("utf-8", "replace").strip()
        except OSError:
            program = "?"
        finally:
            os.close(fd)
        return cls(uid, pid, program)

    @classmethod
    def this_process(cls, program: str) -> Actor:
        return cls(os.getuid(), os.getpid(), program)


def audit_line(
    actor: Actor,
    op: str,
    key: str,
    *,
    when: float,
    old: str | None = None,
    new: os.stat_result | None = None,
    **more: str,
) -> dict[str, object]:
    """One line of ``.history/audit.jsonl``: who did *op* to *key*, and which versions.

    *old* is the kept name of the version that went (``sessionfs restore --at`` takes
    its time); *new* the stat of the version made current, if any.
    """
    line: dict[str, object] = {
        "time": stamp_of(when),
        "uid": actor.uid,
        "pid": actor.pid,
        "program": actor.program,
        "op": op,
        "key": key,
        **more,
        "old": old,
        "new": None if new is None else {"mtime": stamp_of(new.st_mtime), "size": new.st_size},
    }
    return line


class History:
    """The kept versions of one ``sessions.d/`` (a directory descriptor the store owns).

    Every path below ``.history`` is walked one directory at a time with
    ``O_NOFOLLOW``: a symlink planted as ``.history`` or as a key's directory is
    never followed, so nothing is linked, listed or removed outside the store.
    """

    def __init__(
        self,
        dir_fd: int,
        *,
        clock: Callable[[], float] = time.time,
        keep_newest: int = KEEP_NEWEST,
        keep_seconds: float = KEEP_SECONDS,
        keeping: bool = True,
        owner: os.stat_result | None = None,
    ) -> None:
        self._dir_fd = dir_fd
        self._owner = owner  # root on a user's store: what the history makes is theirs
        self.keeping = keeping  # false: no new version is kept (the audit goes on)
        self.clock = clock
        self.keep_newest = keep_newest
        self.keep_seconds = keep_seconds
        # when each key was last pruned: a busy key keeps many versions within 30 days,
        # and listing them on every write would make each write cost more than the last
        self._pruned: dict[str, float] = {}
        self._warned: set[str] = set()
        self._audit_lock = threading.Lock()  # stores are shared by worker threads
        self._audit_pending: list[bytes] = []
        self._audit_flushed = -math.inf  # time.monotonic() of the last append

    # -- keeping -------------------------------------------------------------

    def keep(self, name: str) -> str | None:
        """Keep the current file *name* (about to be replaced or removed); its kept name.

        The caller holds the key's lock, and calls :meth:`discard` if the change
        then fails (so a refused write leaves no version that was never replaced).
        A file that cannot be kept (another filesystem's rules, a full disk, a
        hostile ``.history``) is not, with one warning per cause: history is a help,
        never a reason to refuse a write.
        """
        if not self.keeping:
            return None
        now = self.clock()
        base = stamp_of(now)
        try:
            key_fd = self._key_dir(name, create=True)
            assert key_fd is not None
            try:
                kept = self._link_new(name, key_fd, base)
                if now - self._pruned.get(name, -math.inf) >= PRUNE_EVERY_SECONDS:
                    self._pruned[name] = now
                    self._prune(key_fd, now)
                return kept
            finally:
                os.close(key_fd)
        except OSError as exc:
            self._warn_once(f"cannot keep old versions in {HISTORY_DIR}", exc, "it")
            return None

    def _link_new(self, name: str, key_fd: int, base: str) -> str | None:
        for attempt in range(1, 100):
            kept = f"{base}{SUFFIX}" if attempt == 1 else f"{base}~{attempt:02d}{SUFFIX}"
            try:
                os.link(
                    name, kept, src_dir_fd=self._dir_fd, dst_dir_fd=key_fd, follow_symlinks=False
                )
            except FileExistsError:
                continue
            return kept
        return None

    def discard(self, name: str, kept: str | None) -> None:
        """Undo :meth:`keep` of a change that did not happen after all."""
        if kept is None:
            return
        with contextlib.suppress(OSError):
            key_fd = self._key_dir(name, create=False)
            if key_fd is not None:
                try:
                    os.unlink(kept, dir_fd=key_fd)
                finally:
                    os.close(key_fd)

    def _key_dir(self, name: str, *, create: bool) -> int | None:
        """An fd of ``.history/<name>`` (None if absent and not *create*), never via a symlink."""
        history_fd = self._open_dir(self._dir_fd, HISTORY_DIR, create=create, owner=self._owner)
        if history_fd is None:
            return None
        try:
            return self._open_dir(history_fd, name, create=create, owner=self._owner)
        finally:
            os.close(history_fd)

    @staticmethod
    def _open_dir(
        parent_fd: int, name: str, *, create: bool, owner: os.stat_result | None = None
    ) -> int | None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as exc:  # a planted file or symlink: not sessionfs's history
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and not create:
                return None
            raise
        made = False
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            made = True
        fd = os.open(name, flags, dir_fd=parent_fd)
        if made:
            adopt(fd, owner)
        return fd

    # -- reading and pruning ---------------------------------------------------

    def versions(self, name: str) -> list[Kept]:
        """The kept versions of the entry *name*, oldest first."""
        key_fd = self._key_dir(name, create=False)
        if key_fd is None:
            return []
        try:
            return self._versions(key_fd)
        finally:
            os.close(key_fd)

    @staticmethod
    def _versions(key_fd: int) -> list[Kept]:
        found = []
        with os.scandir(key_fd) as listing:
            for dirent in listing:
                stopped = _parse_stamp(dirent.name)
                if stopped is None or not dirent.is_file(follow_symlinks=False):
                    continue
                st = dirent.stat(follow_symlinks=False)
                found.append(Kept(dirent.name, stopped, st.st_size, st.st_mtime, st.st_ino))
        return sorted(found, key=lambda k: (k.stopped, k.name))

    def has(self, name: str) -> bool:
        """Whether the entry file *name* has a directory of kept versions (as :meth:`names`
        lists it), without listing them all."""
        key_fd = self._key_dir(name, create=False)
        if key_fd is None:
            return False
        os.close(key_fd)
        return True

    def names(self) -> list[str]:
        """The entry file names that have kept versions (removed keys included)."""
        try:
            history_fd = self._open_dir(self._dir_fd, HISTORY_DIR, create=False)
        except OSError:
            return []
        if history_fd is None:
            return []
        try:
            with os.scandir(history_fd) as listing:
                return sorted(d.name for d in listing if d.is_dir(follow_symlinks=False))
        finally:
            os.close(history_fd)

    def read(self, name: str, kept: Kept, limit: int) -> bytes:
        key_fd = self._key_dir(name, create=False)
        if key_fd is None:
            raise FileNotFoundError(errno.ENOENT, f"no kept versions of {name}")
        try:
            fd = os.open(
                kept.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=key_fd
            )
        finally:
            os.close(key_fd)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                raise OSError(errno.EINVAL, f"{kept.name} is not a kept entry")
            return f.read(limit + 1)

    def _prune(self, key_fd: int, now: float) -> None:
        """Remove what retention lets go, by name alone: it runs under the key's lock,
        and a busy key keeps thousands of versions within 30 days (a stat and a parse
        of each cost a write ~100 ms; names sort as their times do)."""
        with os.scandir(key_fd) as listing:
            names = sorted(d.name for d in listing if _STAMP_NAME.fullmatch(d.name))
        if len(names) <= self.keep_newest + PRUNE_SLACK:
            return
        cutoff = stamp_of(now - self.keep_seconds)
        for name in names[: len(names) - self.keep_newest]:
            if name >= cutoff:
                break
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(name, dir_fd=key_fd)

    # -- the audit ---------------------------------------------------------------

    def record(self, line: dict[str, object]) -> None:
        """Add *line* to ``.history/audit.jsonl``: at once, or with the next batch (see
        :data:`AUDIT_FLUSH_SECONDS`)."""
        with self._audit_lock:
            self._audit_pending.append(orjson.dumps(line) + b"\n")
            due = (
                len(self._audit_pending) >= AUDIT_FLUSH_LINES
                or time.monotonic() - self._audit_flushed >= AUDIT_FLUSH_SECONDS
            )
        if due:
            self.flush_audit()

    @property
    def audit_pending(self) -> bool:
        return bool(self._audit_pending)

    def flush_audit(self) -> None:
        """Append the pending lines in one ``write`` of O_APPEND (whole lines even with
        two writers); past :data:`AUDIT_MAX_BYTES` the file becomes ``audit.1.jsonl``.
        Not fsynced: the change itself is durable, and its kept version tells what
        happened if a line is lost in a crash.  A failure is said once and never fails
        a change."""
        with self._audit_lock:
            data, self._audit_pending = b"".join(self._audit_pending), []
            self._audit_flushed = time.monotonic()
            if data:
                self._append_audit(data)

    def _append_audit(self, data: bytes) -> None:
        try:
            history_fd = self._open_dir(self._dir_fd, HISTORY_DIR, create=True, owner=self._owner)
            assert history_fd is not None
            try:
                # O_NONBLOCK: a FIFO planted here must not hold a commit (and its key's
                # lock) until someone reads it; only a regular file is written to
                fd = os.open(
                    AUDIT_FILE,
                    os.O_WRONLY
                    | os.O_APPEND
                    | os.O_CREAT
                    | os.O_NOFOLLOW
                    | os.O_NONBLOCK
                    | os.O_CLOEXEC,
                    0o600,
                    dir_fd=history_fd,
                )
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise OSError(errno.EINVAL, "not a regular file")
                    if self._owner is not None and st.st_uid != self._owner.st_uid:
                        adopt(fd, self._owner)
                    os.write(fd, data)
                    written = os.fstat(fd)
                finally:
                    os.close(fd)
                if written.st_size > AUDIT_MAX_BYTES:
                    self._rotate_audit(history_fd, written)
            finally:
                os.close(history_fd)
        except OSError as exc:
            self._warn_once(f"cannot append to {HISTORY_DIR}/{AUDIT_FILE}", exc, "its audit line")

    @staticmethod
    def _rotate_audit(history_fd: int, written: os.stat_result) -> None:
        """The full audit file becomes the older one, unless another process (the daemon,
        a ``restore``) rotated it first: then the name holds a new, small file, which
        must not replace the full one."""
        try:
            now = os.stat(AUDIT_FILE, dir_fd=history_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # rotated by the other process a moment ago
        if (now.st_dev, now.st_ino) == (written.st_dev, written.st_ino):
            os.rename(AUDIT_FILE, AUDIT_OLDER, src_dir_fd=history_fd, dst_dir_fd=history_fd)

    def _warn_once(self, what: str, exc: OSError, without: str) -> None:
        """History is a help, never a reason to refuse a change: one warning per cause."""
        why = f"{what}: {exc.strerror or exc}"
        if why not in self._warned:
            self._warned.add(why)
            log.warning("%s (the change goes on without %s)", why, without)

    def audit(self, tail_bytes: int | None = None) -> list[dict[str, object]]:
        """The audit lines kept, oldest first (see :func:`read_audit`)."""
        return read_audit(self._dir_fd, tail_bytes)

    def remove_version(self, name: str, kept: Kept) -> bool:
        """Remove one kept version of *name* (maintenance); whether it was there."""
        key_fd = self._key_dir(name, create=False)
        if key_fd is None:
            return False
        try:
            os.unlink(kept.name, dir_fd=key_fd)
        except (FileNotFoundError, IsADirectoryError):
            return False
        finally:
            os.close(key_fd)
        return True

    def purge(self, name: str) -> int:
        """Remove every kept version of *name* at once (a secret edited out); how many."""
        key_fd = self._key_dir(name, create=False)
        if key_fd is None:
            return 0
        try:
            versions = self._versions(key_fd)
            for kept in versions:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(kept.name, dir_fd=key_fd)
        finally:
            os.close(key_fd)
        with contextlib.suppress(OSError):
            history_fd = self._open_dir(self._dir_fd, HISTORY_DIR, create=False)
            if history_fd is not None:
                try:
                    os.rmdir(name, dir_fd=history_fd)
                finally:
                    os.close(history_fd)
        return len(versions)


def read_audit(entries_fd: int, tail_bytes: int | None = None) -> list[dict[str, object]]:
    """The audit lines of the ``sessions.d/`` open as *entries_fd*, oldest first (with
    *tail_bytes*, only those in the last that many bytes); lines that do not parse, or
    are not as :func:`audit_line` writes them, are skipped.  Nothing is followed or
    waited for: a symlink, FIFO or directory planted as the audit is not read."""
    history_fd = History._open_dir(entries_fd, HISTORY_DIR, create=False)
    if history_fd is None:
        return []
    chunks: list[bytes] = []
    left = 2 * AUDIT_MAX_BYTES if tail_bytes is None else tail_bytes
    try:
        for name in (AUDIT_FILE, AUDIT_OLDER):  # newest first, while bytes are wanted
            try:
                fd = os.open(
                    name,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=history_fd,
                )
            except OSError:  # absent, or a planted symlink
                continue
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    continue
                start = max(0, st.st_size - left)
                f.seek(start)
                data = f.read(left)
                if start:  # begun mid-line: that line is not whole
                    data = data.partition(b"\n")[2]
                chunks.insert(0, data)
                left -= len(data)
            if start or left <= 0:
                break  # the older file would not continue where this one starts
    finally:
        os.close(history_fd)
    lines: list[dict[str, object]] = []
    for raw in b"\n".join(chunks).splitlines():  # (an unterminated last line stays apart)
        with contextlib.suppress(orjson.JSONDecodeError):
            line = orjson.loads(raw)
            if _well_formed(line):
                lines.append(line)
    return lines


_AUDIT_TEXT = ("op", "key", "old", "renamed_from", "program")
_AUDIT_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _well_formed(line: object) -> bool:
    """An audit line as :func:`audit_line` writes them (the file may have been edited)."""
    return (
        isinstance(line, dict)
        and isinstance(line.get("key"), str)
        and isinstance(line.get("time"), str)
        and _AUDIT_TIME.fullmatch(line["time"]) is not None
        and all(isinstance(line.get(field), str | None) for field in _AUDIT_TEXT)
        and all(isinstance(line.get(field), int | None) for field in ("uid", "pid"))
    )
