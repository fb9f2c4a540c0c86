"""Drive the FUSE layer without a mount: the Operations handlers called as the kernel would.

:class:`Driver` speaks in names and bytes, the way a tool does through the mount;
:class:`PausingStore` is the seam for race tests: a store whose worker-thread calls
stop at a named point until the test lets them go.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from sessionfs.catalog import Catalog
from sessionfs.fs import Filesystem, Limits, assemble
from sessionfs.fs.quick import QuickCalls
from sessionfs.sources import resolve
from sessionfs.store import Commit, SessionStore, Snapshot


@dataclass
class Ctx:
    """A request context: who asks (the handlers read umask only)."""

    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


CTX: Any = Ctx()


class Gate:
    """Stops a worker thread at one point until the test lets it go."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()

    def __call__(self) -> None:
        self.reached.set()
        if not self.go.wait(10):
            raise TimeoutError("the test never let the paused call go")


@dataclass
class Gates:
    """Named pause points of a :class:`PausingStore` (none armed by default)."""

    armed: dict[str, Gate] = field(default_factory=dict)

    def arm(self, point: str) -> Gate:
        gate = self.armed[point] = Gate()
        return gate

    def pause(self, point: str) -> None:
        gate = self.armed.pop(point, None)
        if gate is not None:
            gate()


class PausingStore(SessionStore):
    """A real store whose calls can pause before or after their I/O (in the worker thread)."""

    def __init__(self, path: Path, max_entry_bytes: int, gates: Gates) -> None:
        super().__init__(path, create=False, max_entry_bytes=max_entry_bytes)
        self.gates = gates

    def write(self, key: str, data: bytes, **kwargs: Any) -> Commit:
        self.gates.pause("before write")
        commit = super().write(key, data, **kwargs)
        self.gates.pause("after write")
        return commit

    def remove(self, key: str, **kwargs: Any) -> Snapshot:
        self.gates.pause("before remove")
        removed = super().remove(key, **kwargs)
        self.gates.pause("after remove")
        return removed

    def read(self, key: str) -> Snapshot:
        snap = super().read(key)
        self.gates.pause("after read")
        return snap

    def stat_many(self, keys: list[str]) -> list[os.stat_result | None]:
        self.gates.pause("in stat_many")  # a listing has its keys, not yet their stats
        return super().stat_many(keys)

    def rename(self, old: str, new: str, **kwargs: Any) -> os.stat_result:
        st = super().rename(old, new, **kwargs)
        self.gates.pause("after rename")
        return st


class Clock:
    """A clock the test moves (grace periods)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_filesystem(
    source: Path,
    gates: Gates | None = None,
    clock: Callable[[], float] | None = None,
    **options: Any,
) -> Filesystem:
    """A filesystem over *source* whose stores pause at *gates*; no kernel behind it."""
    gates = gates or Gates()
    catalog = Catalog(
        resolve(source),
        store_factory=lambda path, cap: PausingStore(path, cap, gates),
    )
    if clock is not None:
        options["clock"] = clock
    options.setdefault("limits", Limits(max_entry_bytes=catalog.max_entry_bytes))
    options.setdefault("quick", QuickCalls(enabled=False))  # paused calls: in trio threads
    return assemble(catalog, **options)


class Replies:
    """Stands in for pyfuse3.readdir_reply, accepting *room* entries per readdir call."""

    def __init__(self, room: int = 1_000_000) -> None:
        self.room = room
        self.names: list[str] = []
        self.next_ids: list[int] = []

    def __call__(
        self, token: object, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int
    ) -> bool:
        if self.room == 0:
            return False
        self.room -= 1
        self.names.append(name.decode())
        self.next_ids.append(next_id)
        return True


class Driver:
    """File operations by name in one directory of a filesystem, as a tool makes them."""

    def __init__(
        self, fs: Filesystem, monkeypatch: pytest.MonkeyPatch, directory: int = pyfuse3.ROOT_INODE
    ) -> None:
        self.fs = fs
        self.ops = fs.operations
        self.directory = directory
        self.monkeypatch = monkeypatch

    async def lookup(self, name: str) -> pyfuse3.EntryAttributes:
        return await self.ops.lookup(self.directory, name.encode(), CTX)

    async def exists(self, name: str) -> bool:
        try:
            await self.lookup(name)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.ENOENT, exc
            return False
        return True

    async def read(self, name: str) -> bytes:
        ino = (await self.lookup(name)).st_ino
        info = await self.ops.open(ino, os.O_RDONLY, CTX)
        try:
            chunks, offset = [], 0
            while chunk := await self.ops.read(info.fh, offset, 128 * 1024):
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        finally:
            await self.ops.release(info.fh)

    async def open(self, name: str, flags: int) -> int:
        """Open (or create, with O_CREAT) *name*; returns the file handle."""
        if flags & os.O_CREAT:
            info, _ = await self.ops.create(self.directory, name.encode(), 0o600, flags, CTX)
            return info.fh
        ino = (await self.lookup(name)).st_ino
        return (await self.ops.open(ino, flags, CTX)).fh

    async def close(self, fh: int) -> None:
        """close(2): flush (its error is the caller's), then release."""
        try:
            await self.ops.flush(fh)
        finally:
            await self.ops.release(fh)

    async def write(self, name: str, data: bytes, flags: int = os.O_WRONLY | os.O_TRUNC) -> None:
        """Write *data* to *name* as ``cp`` or a redirect does; errors from close raise."""
        fh = await self.open(name, flags)
        try:
            if data:
                await self.ops.write(fh, 0, data)
        except BaseException:
            await self.ops.release(fh)
            raise
        await self.close(fh)

    async def unlink(self, name: str) -> None:
        await self.ops.unlink(self.directory, name.encode(), CTX)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        await self.ops.rename(
            self.directory, old.encode(), self.directory, new.encode(), flags, CTX
        )

    async def listdir(self) -> list[str]:
        replies = Replies()
        self.monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
        fh = await self.ops.opendir(self.directory, CTX)
        try:
            await self.ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        finally:
            await self.ops.releasedir(fh)
        return sorted(replies.names)

    async def editor_save(self, name: str, data: bytes, backup: str | None = None) -> None:
        """vim's default save (emacs's is alike): rename to a backup, write anew, drop it."""
        backup = backup or f"{name}~"
        await self.rename(name, backup)
        fh = await self.open(name, os.O_WRONLY | os.O_CREAT)
        try:
            await self.ops.setattr(
                (await self.lookup(name)).st_ino, size_of(0), fields(update_size=True), fh, CTX
            )
            await self.ops.write(fh, 0, data)
            await self.ops.fsync(fh, False)
        finally:
            await self.ops.release(fh)
        await self.unlink(backup)


def size_of(size: int) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_size = size
    return attrs


@dataclass
class Fields:
    """Stands in for pyfuse3.SetattrFields, whose attributes Python cannot set."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def fields(**set_fields: bool) -> Any:
    return Fields(**set_fields)
