"""``SessionStore``: one ``sessions.d/`` directory, one JSON file per session key.

All disk I/O of sessionfs happens here.  Every path is opened relative to a file
descriptor of the directory with ``O_NOFOLLOW``, so neither a symlink inside the
store nor a directory swapped in behind it can redirect a read or a write.  A
single-entry operation touches only that entry's file, so its cost does not grow
with the store.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson
import trio

from . import entry as entry_rules
from .errors import EntryExists, EntryNotFound, InvalidEntry, UnsafeEntry
from .history import Actor, History, Retention, audit_line
from .keys import filename_to_key, key_to_filename
from .locking import KeyLocks
from .owners import adopt, foreign_owner

log = logging.getLogger(__name__)

# Temp files start with a dot and do not end in .json, so OpenClaw's loader and
# our listing both skip them; the fixed shape lets cleanup remove only ours.
_TEMP_RE = re.compile(r"^\.sfs-[0-9a-f]{16}\.tmp$")
STRAY_TEMP_AGE = 60.0


def _temp_name() -> str:
    """A temp file name no one else uses: the watcher tells the daemon's own renames by it."""
    return f".sfs-{secrets.token_hex(8)}.tmp"


def is_temp_name(name: str) -> bool:
    """Whether *name* is one of the store's own temp files (``.sfs-<hex>.tmp``)."""
    return _TEMP_RE.match(name) is not None


DIR_MODE = 0o700
FILE_MODE = 0o600

_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _check_libc(result: int, path: str | None = None) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)  # EEXIST makes a FileExistsError


def _renameat2(old_dir_fd: int, old: str, new_dir_fd: int, new: str, flags: int) -> None:
    _check_libc(
        _libc.renameat2(old_dir_fd, os.fsencode(old), new_dir_fd, os.fsencode(new), flags), new
    )


def rename_noreplace(old: str | os.PathLike[str], new: str | os.PathLike[str]) -> None:
    """Rename *old* to *new* unless *new* exists (``FileExistsError`` then)."""
    _renameat2(-100, os.fspath(old), -100, os.fspath(new), _RENAME_NOREPLACE)  # AT_FDCWD


def _syncfs(fd: int) -> None:
    _check_libc(_libc.syncfs(fd))


def _read_all(fd: int, size: int) -> bytes:
    """Up to *size* + 1 bytes of *fd* (one more tells a file that grew)."""
    chunks, left = [], size + 1
    while left > 0 and (chunk := os.read(fd, max(left, 65536))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One version of an entry: its bytes and the stat of the file they came from."""

    data: bytes
    stat: os.stat_result

    @property
    def version(self) -> Version:
        return Version.of(self.stat)


@dataclass(frozen=True, slots=True)
class Commit:
    """What :meth:`SessionStore.write` did: the new file, and the version it replaced."""

    stat: os.stat_result
    replaced: Version | None  # None: the key was new
    temp: str | None = None  # the temp file renamed into place (None: nothing was written)

    @property
    def version(self) -> Version:
        return Version.of(self.stat)


@dataclass(frozen=True, slots=True)
class Version:
    """Identifies one committed version of an entry file.

    Every commit renames a fresh file into place, so the backing inode number
    changes with each one; with mtime and size it tells versions apart.
    """

    ino: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, st: os.stat_result) -> Version:
        return cls(st.st_ino, st.st_mtime_ns, st.st_size)


ABSENT = Version(-1, -1, -1)
"""The "version" of an entry that does not exist, for ``write(expected=...)``."""


def _replace(
    dir_fd: int,
    name: str,
    temp: str,
    data: bytes,
    *,
    durable: bool = True,
    mtime_ns: int | None = None,
    owner: os.stat_result | None = None,
) -> os.stat_result:
    """The atomic write: *data* into a new *temp* (0600, no symlink followed), fsync,
    rename over *name*, fsync the directory; the new file's stat.  A failure at any
    step leaves *name* as it was and no temp behind (a crash leaves at most a temp)."""
    fd = os.open(
        temp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        FILE_MODE,
        dir_fd=dir_fd,
    )
    try:
        try:
            adopt(fd, owner)
            _write_all(fd, data)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            if durable:
                os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)
    return st


def write_file_atomically(directory: Path, name: str, data: bytes) -> None:
    """Replace *directory*/*name* with *data* the way OpenClaw does (:func:`_replace`).

    For files beside the entries (``sessions.json``, markers): the temp is named
    ``<name>.<random>.tmp`` as OpenClaw's are.  Run as root (``sudo sessionfs ...``),
    the file gets the directory's owner, so the gateway that owns the store can
    still read it.
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = foreign_owner(os.fstat(dir_fd))
        _replace(dir_fd, name, f"{name}.{secrets.token_hex(8)}.tmp", data, owner=owner)
    finally:
        os.close(dir_fd)


def read_small_file(path: Path, limit: int = 64 * 1024) -> bytes | None:
    """*path*'s bytes if it is a regular file of at most *limit* bytes, else None.

    Never follows a symlink and never blocks on a FIFO (a marker file someone replaced).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return _read_all(fd, st.st_size)
    finally:
        os.close(fd)


def _check_regular(st: os.stat_result, name: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = {
            stat.S_IFDIR: "a directory",
            stat.S_IFLNK: "a symlink",
            stat.S_IFIFO: "a FIFO",
            stat.S_IFSOCK: "a socket",
            stat.S_IFCHR: "a device",
            stat.S_IFBLK: "a device",
        }.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise UnsafeEntry(f"{name} in the store is {kind}; sessionfs leaves it alone")


class SessionStore:
    """Read and atomically write the entries of one ``sessions.d/`` directory.

    Thread-safe; safe to share with other processes (and other ``SessionStore``
    objects) using the same directory, because the per-key locks live on disk.
    """

    writable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        max_entry_bytes: int = entry_rules.DEFAULT_MAX_ENTRY_BYTES,
        retention: Retention = Retention(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        self.path = Path(path)
        self.max_entry_bytes = max_entry_bytes
        made = False
        if create:
            with contextlib.suppress(FileExistsError):
                self.path.mkdir(mode=DIR_MODE)
                made = True
        try:
            self._dir_fd = os.open(
                self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeEntry(f"{self.path} is not a directory (or is a symlink)") from None
            raise
        if made:  # (a migration's staging dir, made by root in a user's sessions dir)
            adopt(self._dir_fd, foreign_owner(os.stat(self.path.parent)))
        # Run as root on another user's store (sudo sessionfs mount, a root daemon), what
        # is created belongs to the store's owner: a root-owned 0600 entry is one the
        # user's gateway and sessionfs commands could not read.
        self.owner = foreign_owner(os.fstat(self._dir_fd))
        self.locks = KeyLocks(self._dir_fd, owner=self.owner)
        # every version that stops being current is kept (see .history)
        self.history = History(
            self._dir_fd,
            owner=self.owner,
            keep_newest=retention.keep_newest,
            keep_seconds=retention.keep_seconds,
            keeping=retention.enabled,
        )
        self._reported: set[str] = set()
        self.remove_stray_temps()

    def why_read_only(self) -> str | None:
        return None  # sessions.d/ is the store the mount writes

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        if self._dir_fd >= 0:
            if self.history is not None:
                self.history.flush_audit()
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def dir_fd(self) -> int:
        return self._dir_fd

    def remove_stray_temps(self, older_than: float = STRAY_TEMP_AGE) -> list[str]:
        """Remove temp files that a crashed writer left behind; returns their names."""
        removed = []
        now = time.time()
        for name in os.listdir(self._dir_fd):
            if not _TEMP_RE.match(name):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than:
                    os.unlink(name, dir_fd=self._dir_fd)
                    removed.append(name)
        if removed:
            log.info(
                "%s: removed %d stray temp file(s) of a crashed writer", self.path, len(removed)
            )
        return removed

    # -- reading -----------------------------------------------------------

    def read(self, key: str) -> Snapshot:
        """The current bytes of *key* and the stat of the file they were read from."""
        name = key_to_filename(key)
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                dir_fd=self._dir_fd,
            )
        except FileNotFoundError:
            raise EntryNotFound(f"no session {key!r}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._unsafe(name, "a symlink") from None
            raise
        try:
            st = os.fstat(fd)
            self._check_regular(st, name)
            cap = self.max_entry_bytes
            if st.st_size > cap:
                raise self._too_large(name, st.st_size)
            # Never more than the cap (+1 to notice a file that grew meanwhile):
            # a hostile 1 GiB file must not take the daemon's memory with it.
            chunks, total = [], 0
            while total <= cap and (
                chunk := os.read(fd, min(max(st.st_size + 1, 65536), cap + 1 - total))
            ):
                chunks.append(chunk)
                total += len(chunk)
            if total > cap:
                raise self._too_large(name, total)
        finally:
            os.close(fd)
        return Snapshot(b"".join(chunks), st)

    def stat(self, key: str) -> os.stat_result:
        """The stat of *key*'s file; raises :class:`EntryNotFound` or :class:`UnsafeEntry`."""
        name = key_to_filename(key)
        try:
            st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise EntryNotFound(f"no session {key!r}") from None
        self._check_regular(st, name)
        return st

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except EntryNotFound:
            return False
        return True

    def scan(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Stream ``(key, dir entry)`` for every entry without reading any entry.

        Temps, dotfiles, other names, symlinks, FIFOs and directories are skipped;
        foreign ones are logged once.
        """
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._dir_fd)
        # scandir() on a dup of the store's fd would share its offset with
        # concurrent scans; a fresh descriptor gives each scan its own.
        try:
            with os.scandir(fd) as it:
                for dirent in it:
                    name = dirent.name
                    if name.startswith(".") or not name.endswith(".json"):
                        continue
                    key = filename_to_key(name)
                    if key is None:
                        self._report(name, "is not the canonical file name of any key")
                        continue
                    if not dirent.is_file(follow_symlinks=False):
                        self._report(name, "is not a regular file")
                        continue
                    yield key, dirent
        finally:
            os.close(fd)

    def keys(self) -> Iterator[str]:
        """Stream the keys of every entry (see :meth:`scan`)."""
        for key, _ in self.scan():
            yield key

    def stat_many(self, keys: list[str]) -> list[os.stat_result | None]:
        """The stat of each key's entry, ``None`` where it is gone or not an entry."""
        out: list[os.stat_result | None] = []
        for key in keys:
            try:
                out.append(self.stat(key))
            except (EntryNotFound, UnsafeEntry):
                out.append(None)
        return out

    # -- writing -----------------------------------------------------------

    def write(
        self,
        key: str,
        data: bytes,
        *,
        validate: bool = True,
        durable: bool = True,
        expected: Version | None = None,
        mtime_ns: int | None = None,
        lock_wait: float | None = None,
        actor: Actor | None = None,
        op: str = "written",
    ) -> Commit:
        """Atomically replace (or create) *key* with *data* under its lock.

        *data* is stored byte for byte.  With *expected* (a version, or
        :data:`ABSENT` for "must not exist yet"), the commit only happens if the
        entry is still that version, else :class:`EntryChanged` (``ESTALE``).
        The result tells which version this commit replaced.

        Writing exactly the bytes the entry holds changes nothing (no new version,
        so the mtime stays) and is accepted even if those bytes would not pass
        validation today: a round trip of what the store gave out never fails.
        *mtime_ns* sets the new file's mtime (restoring a version keeps its time).
        *lock_wait* bounds the wait for the key's lock (see :meth:`KeyLocks.hold`).
        With *actor*, the change is recorded in the audit as *op*.
        """
        name = key_to_filename(key)
        refusal: InvalidEntry | None = None
        if validate:
            try:
                entry_rules.validate(data, self.max_entry_bytes)
            except InvalidEntry as exc:
                refusal = exc
        with self.locks.hold(key, wait=lock_wait):
            previous = self._target(name)
            replaced = Version.of(previous) if previous is not None else None
            if previous is not None and self._holds(name, previous, data):
                return Commit(previous, replaced)  # whoever wrote it, it is what we hold
            if expected is not None and (replaced or ABSENT) != expected:
                raise EntryChanged(key, expected, replaced)
            if refusal is not None:
                raise refusal
            temp = _temp_name()
            with self._keeping(name if previous is not None else None) as kept:
                st = self._commit(name, data, durable=durable, mtime_ns=mtime_ns, temp=temp)
            self._audit(actor, op, key, old=kept, new=st)
            return Commit(st, replaced, temp)

    def update(
        self, key: str, change: Callable[[entry_rules.Entry | None], entry_rules.Entry]
    ) -> entry_rules.Entry:
        """Read-modify-write *key* under its lock; *change* gets ``None`` for a new key.

        The new entry is validated and written the way OpenClaw writes entries.
        """
        name = key_to_filename(key)
        with self.locks.hold(key):
            try:
                current = entry_rules.loads(self.read(key).data)
            except EntryNotFound:
                current = None
            except orjson.JSONDecodeError as exc:
                raise InvalidEntry(f"stored entry {key!r} is not valid JSON: {exc}") from None
            new = change(current)
            data = entry_rules.dumps(new)
            entry_rules.validate(data, self.max_entry_bytes)
            with self._keeping(name if self._target(name) is not None else None):
                self._commit(name, data, durable=True)
            return new

    def delete(
        self,
        key: str,
        *,
        only_if: Callable[[Snapshot], bool] | None = None,
        lock_wait: float | None = None,
        actor: Actor | None = None,
        op: str = "removed",
        keep_version: bool = True,
    ) -> bool:
        """Remove *key* under its lock.

        With *only_if*, the current version is read under the lock and removed only
        if the predicate accepts it.  Returns whether the entry was removed.  With
        *actor*, the removal is recorded in the audit as *op*.  Without
        *keep_version*, the history does not keep it (a disk budget frees its bytes).
        """
        removed = self._remove(
            key,
            only_if=only_if,
            keep=False,
            lock_wait=lock_wait,
            actor=actor,
            op=op,
            keep_version=keep_version,
        )
        return removed is not None

    def remove(
        self,
        key: str,
        *,
        only_if: Callable[[Snapshot], bool] | None = None,
        lock_wait: float | None = None,
        actor: Actor | None = None,
        op: str = "removed",
    ) -> Snapshot:
        """Remove *key* under its lock and return the version that went (for an undo).

        Raises :class:`EntryNotFound`, or :class:`EntryChanged` when *only_if*
        refuses the current version.
        """
        removed = self._remove(
            key, only_if=only_if, keep=True, lock_wait=lock_wait, actor=actor, op=op
        )
        if removed is None:
            raise EntryChanged(key, ABSENT, None)
        return removed

    def _remove(
        self,
        key: str,
        *,
        only_if: Callable[[Snapshot], bool] | None,
        keep: bool,
        lock_wait: float | None,
        actor: Actor | None,
        op: str,
        keep_version: bool = True,
    ) -> Snapshot | None:
        name = key_to_filename(key)
        with self.locks.hold(key, wait=lock_wait):
            if only_if is not None or keep:
                current = self.read(key)
                if only_if is not None and not only_if(current):
                    return None
            else:
                current = Snapshot(b"", self.stat(key))
            with self._keeping(name if keep_version else None) as kept:
                os.unlink(name, dir_fd=self._dir_fd)
            os.fsync(self._dir_fd)
            self._audit(actor, op, key, old=kept)
            return current

    def rename(
        self,
        old: str,
        new: str,
        *,
        replace: bool = True,
        lock_wait: float | None = None,
        actor: Actor | None = None,
    ) -> os.stat_result:
        """Give entry *old* the key *new* in one atomic rename; returns the entry's stat.

        Without *replace*, an existing *new* makes it fail with ``EEXIST``.
        """
        old_name, new_name = key_to_filename(old), key_to_filename(new)
        with self.locks.hold(old, new, wait=lock_wait):
            moved = self.stat(old)
            if old_name == new_name:
                return moved
            over: str | None = None  # the version renamed over is kept
            try:
                self.stat(new)
            except EntryNotFound:
                pass
            else:
                if not replace:
                    raise EntryExists(f"session {new!r} exists")
                over = new_name
            # (the moved version lives on under *new*; it is kept when that changes)
            try:
                with self._keeping(over) as kept:
                    _renameat2(
                        self._dir_fd,
                        old_name,
                        self._dir_fd,
                        new_name,
                        0 if replace else _RENAME_NOREPLACE,
                    )
            except FileExistsError:
                raise EntryExists(f"session {new!r} exists") from None
            os.fsync(self._dir_fd)
            st = self.stat(new)
            self._audit(actor, "renamed", new, old=kept, new=st, renamed_from=old)
            return st

    # -- bulk work on a directory that is not live yet (migration) ----------

    def create_unlocked(self, key: str, data: bytes, *, mtime_ns: int | None = None) -> None:
        """Create *key* directly: no temp file, no lock, no fsync.

        Only for a private directory that goes live as a whole later (migration
        staging): nobody can see a half-written file there, and :meth:`sync`
        makes everything durable at once.  Raises ``FileExistsError``.
        """
        fd = os.open(
            key_to_filename(key),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            FILE_MODE,
            dir_fd=self._dir_fd,
        )
        try:
            adopt(fd, self.owner)
            _write_all(fd, data)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Make every file written so far durable with one ``syncfs``, not one fsync each."""
        _syncfs(self._dir_fd)
        os.fsync(self._dir_fd)

    def move_into(self, other: SessionStore) -> tuple[list[str], list[str]]:
        """Move every entry into *other* without replacing any (the one there wins).

        Returns ``(moved, kept)`` keys; *kept* entries stay here.  Each move is an
        atomic ``renameat2(RENAME_NOREPLACE)``, so a concurrent writer of *other*
        is never overwritten.
        """
        moved, kept = [], []
        for key, dirent in list(self.scan()):
            try:
                _renameat2(self._dir_fd, dirent.name, other.dir_fd, dirent.name, _RENAME_NOREPLACE)
            except FileExistsError:
                kept.append(key)
            else:
                moved.append(key)
        os.fsync(other.dir_fd)
        os.fsync(self._dir_fd)
        return moved, kept

    # -- internals ---------------------------------------------------------

    def _target(self, name: str) -> os.stat_result | None:
        """The stat of what *name* holds now (None if nothing); refuses non-regular files."""
        try:
            target = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        self._check_regular(target, name)
        return target

    def _holds(self, name: str, current: os.stat_result, data: bytes) -> bool:
        """Whether *name* (whose stat is *current*) holds exactly *data*."""
        if current.st_size != len(data):
            return False
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self._dir_fd,
            )
        except FileNotFoundError:
            return False
        try:
            return os.fstat(fd).st_ino == current.st_ino and _read_all(fd, len(data)) == data
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _keeping(self, name: str | None) -> Iterator[str | None]:
        """Keep the current version of *name* (None: nothing to keep) for the change made
        inside, which gets the kept version's name; a change that fails takes its kept
        version back (lock held)."""
        if name is None or self.history is None:
            yield None
            return
        kept = self.history.keep(name)
        try:
            yield kept
        except BaseException:
            self.history.discard(name, kept)
            raise

    def _audit(self, actor: Actor | None, op: str, key: str, **fields: Any) -> None:
        """One audit line for a change made on behalf of *actor* (None: not audited)."""
        if actor is not None and self.history is not None:
            self.history.record(audit_line(actor, op, key, when=time.time(), **fields))

    def _commit(
        self,
        name: str,
        data: bytes,
        *,
        durable: bool,
        mtime_ns: int | None = None,
        temp: str | None = None,
    ) -> os.stat_result:
        """Temp file (*temp*, or a new name), write, fsync, rename over *name*, fsync the
        directory.

        The caller holds the key's lock and has checked the target with :meth:`_target`.
        """
        temp = temp or _temp_name()
        return _replace(
            self._dir_fd, name, temp, data, durable=durable, mtime_ns=mtime_ns, owner=self.owner
        )

    def _check_regular(self, st: os.stat_result, name: str) -> None:
        try:
            _check_regular(st, name)
        except UnsafeEntry as exc:
            self._report(name, str(exc))
            raise

    def _too_large(self, name: str, size: int) -> InvalidEntry:
        reason = (
            f"{name} in the store is {size} bytes, over the {self.max_entry_bytes}-byte cap; "
            "refused, never read whole"
        )
        self._report(name, reason)
        return InvalidEntry(reason, code=errno.EFBIG)

    def _unsafe(self, name: str, kind: str) -> UnsafeEntry:
        exc = UnsafeEntry(f"{name} in the store is {kind}; sessionfs leaves it alone")
        self._report(name, str(exc))
        return exc

    def _report(self, name: str, reason: str) -> None:
        if name not in self._reported:
            self._reported.add(name)
            log.warning("%s: %s %s", self.path, name, reason.removeprefix(f"{name} "))


class EntryChanged(UnsafeEntry):
    """The entry is no longer the version a writer started from (``ESTALE``)."""

    default_errno = errno.ESTALE

    def __init__(self, key: str, expected: Version, current: Version | None) -> None:
        super().__init__(f"session {key!r} changed since it was opened")
        self.key, self.expected, self.current = key, expected, current

    def __reduce__(self) -> tuple[object, ...]:
        return (EntryChanged, (self.key, self.expected, self.current))


_P = ParamSpec("_P")
_R = TypeVar("_R")


class AsyncSessionStore:
    """The trio face of a :class:`SessionStore`.

    Blocking work (lock waits, fsync) runs in worker threads, so one session's
    commit never stalls requests for other sessions on the trio thread.
    """

    def __init__(self, store: SessionStore, limiter: trio.CapacityLimiter | None = None) -> None:
        self.sync = store
        self._limiter = limiter

    async def _run(self, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self._limiter
        )

    async def read(self, key: str) -> Snapshot:
        return await self._run(self.sync.read, key)

    async def stat(self, key: str) -> os.stat_result:
        return await self._run(self.sync.stat, key)

    async def write(
        self, key: str, data: bytes, *, validate: bool = True, expected: Version | None = None
    ) -> Commit:
        return await self._run(self.sync.write, key, data, validate=validate, expected=expected)

    async def update(
        self, key: str, change: Callable[[entry_rules.Entry | None], entry_rules.Entry]
    ) -> entry_rules.Entry:
        return await self._run(self.sync.update, key, change)

    async def delete(self, key: str, *, only_if: Callable[[Snapshot], bool] | None = None) -> bool:
        return await self._run(self.sync.delete, key, only_if=only_if)

    async def rename(self, old: str, new: str, *, replace: bool = True) -> os.stat_result:
        return await self._run(self.sync.rename, old, new, replace=replace)

    async def keys(self) -> list[str]:
        return await self._run(lambda: list(self.sync.keys()))
