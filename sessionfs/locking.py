"""Locks: per-session locks on ``sessions.d/`` and OpenClaw's ``sessions.json.lock``.

Per-session locks are OFD byte-range locks (``F_OFD_SETLKW``) on one file,
``sessions.d/.lock``, at an offset derived from the key.  Every acquisition opens
its own file description, and OFD locks belong to the description, so the same
lock excludes other threads of this process and other processes alike; nothing
is kept per key, so nothing piles up.  Two keys sharing an offset (a 62-bit hash
collision) would only make them wait for each other, never break exclusion.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from .errors import LockBusy, LockTimeout, UnsafeEntry

LOCK_FILE = ".lock"
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux


def key_offset(key: str) -> int:
    """The byte of the lock file that stands for *key*."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2  # stays a positive off_t


class KeyLocks:
    """Exclusive per-key locks shared by every thread and process using one store."""

    def __init__(self, dir_fd: int, *, owner: os.stat_result | None = None) -> None:
        self._dir_fd = dir_fd
        self._owner = owner  # root on a user's store: the lock file is theirs too

    def _open(self) -> int:
        fd = os.open(
            LOCK_FILE,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self._dir_fd,
        )
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsafeEntry(f"{LOCK_FILE} in the store is not a regular file")
        owner = self._owner
        if owner is not None and (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
            os.fchown(fd, owner.st_uid, owner.st_gid)
        return fd

    @contextlib.contextmanager
    def hold(self, *keys: str, wait: float | None = None) -> Iterator[None]:
        """Hold the locks of *keys*.

        *wait* None blocks until they are free; a number of seconds gives up
        after that long (0: one try) with :class:`LockBusy` (EBUSY), so a
        caller that must not hang (the mount) can wait elsewhere.  Several
        keys are taken in offset order so that two holders can never wait for
        each other in a cycle.
        """
        fd = self._open()
        try:
            deadline = None if wait is None else time.monotonic() + wait
            for offset, key in sorted({key_offset(k): k for k in keys}.items()):
                self._take(fd, offset, key, deadline)
            yield
        finally:
            os.close(fd)  # closing the description releases its locks

    @staticmethod
    def _take(fd: int, offset: int, key: str, deadline: float | None) -> None:
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        if deadline is None:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, request)
            return
        delay = 0.001
        while True:
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
                return
            except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held elsewhere
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockBusy(key) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)

    def is_held(self, key: str) -> bool:
        """Whether another holder has *key* locked right now (for tests and diagnostics)."""
        fd = self._open()
        try:
            probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, key_offset(key), 1, 0)
            result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
            lock_type: int = _FLOCK.unpack(result)[0]
            return lock_type != fcntl.F_UNLCK
        finally:
            os.close(fd)


# --- OpenClaw's JSON-era store lock -------------------------------------------

STORE_LOCK_TIMEOUT = 10.0
STORE_LOCK_STALE_AFTER = 30.0


def _proc_stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 on (``[0]`` is field 3), or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def process_starttime(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat``: tells a live pid from a recycled one."""
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[22 - 3])


def pid_alive(pid: int) -> bool:
    """Whether *pid* runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    return fields is None or fields[0] != "Z"


def _lock_payload() -> bytes:
    pid = os.getpid()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return orjson.dumps(
        {"pid": pid, "createdAt": now, "starttime": process_starttime(pid)},
        option=orjson.OPT_INDENT_2,
    )


def lock_holder(lock_path: Path) -> dict[str, object] | None:
    """The parsed payload of a store lock, or ``None`` if it cannot be read."""
    try:
        payload = orjson.loads(lock_path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def is_stale(lock_path: Path, stale_after: float = STORE_LOCK_STALE_AFTER) -> bool:
    """OpenClaw's rules: dead or recycled pid, invalid createdAt, or older than *stale_after*."""
    holder = lock_holder(lock_path)
    if holder is None:
        # The holder may be between its O_EXCL create and its write: only age counts.
        try:
            return time.time() - lock_path.lstat().st_mtime > stale_after
        except FileNotFoundError:
            return False
    pid, created, starttime = holder.get("pid"), holder.get("createdAt"), holder.get("starttime")
    if not isinstance(created, str):
        return True
    try:
        created_at = dt.datetime.fromisoformat(created)
    except ValueError:
        return True
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=dt.UTC)
    if (dt.datetime.now(dt.UTC) - created_at).total_seconds() > stale_after:
        return True
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        return True
    return isinstance(starttime, int) and process_starttime(pid) not in (None, starttime)


STORE_LOCK_REFRESH = 10.0  # seconds: well inside OpenClaw's 30 s staleness by createdAt


@contextlib.contextmanager
def openclaw_store_lock(
    sessions_json: Path,
    timeout: float = STORE_LOCK_TIMEOUT,
    stale_after: float = STORE_LOCK_STALE_AFTER,
    refresh_every: float = STORE_LOCK_REFRESH,
) -> Iterator[None]:
    """Hold ``sessions.json.lock`` with OpenClaw's protocol, so a JSON-era gateway waits.

    While held, ``createdAt`` is renewed every *refresh_every* seconds (atomically,
    by rename), so a long migration is never taken for a stale lock; on release
    the file is removed only if it is still ours.
    """
    lock_path = sessions_json.with_name(sessions_json.name + ".lock")
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            fd = os.open(
                lock_path,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except FileExistsError:
            if is_stale(lock_path, stale_after):
                _remove_stale(lock_path)
                continue
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                holder = lock_holder(lock_path) or {}
                raise LockTimeout(
                    f"timeout acquiring session store lock {lock_path} "
                    f"(held by pid {holder.get('pid', '?')} since {holder.get('createdAt', '?')}); "
                    "is an OpenClaw gateway still writing this store? Stop it or retry later"
                ) from None
            time.sleep(min(min(1000, 50 * attempt) / 1000, remaining))
            continue
        break
    stop = threading.Event()
    try:
        with os.fdopen(fd, "wb") as lock_file:
            lock_file.write(_lock_payload())
        refresher = threading.Thread(
            target=_keep_fresh, args=(lock_path, stop, refresh_every), daemon=True
        )
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            refresher.join()
    finally:
        if _is_ours(lock_path):
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()


def _is_ours(lock_path: Path) -> bool:
    holder = lock_holder(lock_path)
    return holder is not None and holder.get("pid") == os.getpid()


def _keep_fresh(lock_path: Path, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        if not _is_ours(lock_path):
            return  # taken over (we were judged stale): never write someone else's lock
        temp = lock_path.with_name(f"{lock_path.name}.{os.getpid()}.tmp")
        try:
            temp.write_bytes(_lock_payload())
            os.rename(temp, lock_path)
        except OSError:
            with contextlib.suppress(OSError):
                temp.unlink()


def remove_stale_lock(sessions_json: Path) -> bool:
    """Remove a ``sessions.json.lock`` whose holder died (a migration killed after its backup).

    Returns whether one was removed; a live holder's lock is left alone.
    """
    lock_path = sessions_json.with_name(sessions_json.name + ".lock")
    if not lock_path.is_file() or lock_path.is_symlink() or not is_stale(lock_path):
        return False
    _remove_stale(lock_path)
    return True


def _remove_stale(lock_path: Path) -> None:
    try:
        lock_path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise UnsafeEntry(f"{lock_path} is a directory, not a lock file") from None
