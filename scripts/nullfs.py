"""A do-nothing pyfuse3 filesystem: the floor for sessionfs's requests in the benchmarks.

It serves N fixed in-memory files with long entry and attribute timeouts and does no
I/O at all, so what it costs is the price of a FUSE round trip into Python.  Files are
opened with keep_cache (reads answered by the page cache), or with direct_io as
sessionfs opens session files (every read a round trip) when MODE is "direct".

MODE "commit" is the floor for an update: files are also writable (direct_io, a
buffer per open), and a flush stores the buffer with one ``SessionStore.write`` of
the file's key into STORE (a ``sessions.d/``), in the request handler itself.  That
is the least any filesystem in front of the store must do; sessionfs cannot commit
in the handler (a hung disk would then hang every request of the mount), and does
everything else a mount needs (validation of the open's version, the index, the
watcher, the audit).
Usage: nullfs.py MOUNTPOINT COUNT SIZE [cached|direct|commit STORE]
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections.abc import Sequence

import pyfuse3
import trio

from sessionfs.store import SessionStore

TIMEOUT = 300.0


class NullFS(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, count: int, size: int, direct_io: bool = False) -> None:
        super().__init__()
        self.direct_io = direct_io
        self.names = [f"agent:bench:webchat:direct:{i}.json".encode() for i in range(count)]
        self.inodes = {name: i + 2 for i, name in enumerate(self.names)}
        self.content = b"x" * size

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.entry_timeout = attrs.attr_timeout = TIMEOUT
        if ino == pyfuse3.ROOT_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o700, 2
        else:
            attrs.st_mode, attrs.st_nlink, attrs.st_size = (
                stat.S_IFREG | 0o600,
                1,
                len(self.content),
            )
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        return attrs

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ino = self.inodes.get(name)
        if parent_inode != pyfuse3.ROOT_INODE or ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i in range(start_id, len(self.names)):
            if not pyfuse3.readdir_reply(token, self.names[i], self._attrs(i + 2), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.direct_io:
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.content[off : off + size]

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None


class CommitFS(NullFS):
    """NullFS whose files take writes, each close committing them to a store."""

    def __init__(self, count: int, size: int, store: SessionStore) -> None:
        super().__init__(count, size, direct_io=True)
        self.store = store
        self.keys = {ino: name.decode()[: -len(".json")] for name, ino in self.inodes.items()}
        self.buffers: dict[int, tuple[int, bytearray]] = {}
        self.next_fh = 1

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.buffers[fh] = (inode, bytearray())
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = self.buffers[fh][1]
        data[off : off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh: int) -> None:
        inode, data = self.buffers[fh]
        if data:
            self.store.write(self.keys[inode], bytes(data))

    async def release(self, fh: int) -> None:
        del self.buffers[fh]


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    mountpoint, count, size = argv[0], int(argv[1]), int(argv[2])
    if argv[3:4] == ["commit"]:
        fs: NullFS = CommitFS(count, size, SessionStore(argv[4], create=False))
    else:
        fs = NullFS(count, size, direct_io=argv[3:] == ["direct"])
    pyfuse3.init(
        fs,
        mountpoint,
        {"fsname=nullfs", "subtype=nullfs", "auto_unmount"},
    )
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(sys.argv[1:])
