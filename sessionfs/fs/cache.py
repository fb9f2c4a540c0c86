"""Bytes of recently read entry versions, so reopening an unchanged session needs no I/O.

Keyed by (directory inode, key) and checked against the version.  A version (inode,
mtime, size) can repeat: ext4 hands a freed inode number straight back, and where
timestamps are coarse (before Linux 6.13's multigrain timestamps, and on filesystems
without them) a writer replacing an entry three times within one clock tick with
same-sized content makes the third look like the first.  So the index also drops a
key's bytes whenever the store tells of an outside change of it (an inotify event),
whatever the new stat says.
"""

from __future__ import annotations

from collections import OrderedDict

from ..store import Version

DEFAULT_CONTENT_CACHE_BYTES = 32 * 1024 * 1024

CacheKey = tuple[int, str]


class ContentCache:
    """A least-recently-used map of (directory, key) -> (version, bytes), bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CONTENT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[CacheKey, tuple[Version, bytes]] = OrderedDict()

    def get(self, where: CacheKey, version: Version) -> bytes | None:
        item = self._items.get(where)
        if item is None or item[0] != version:
            return None
        self._items.move_to_end(where)
        return item[1]

    def put(self, where: CacheKey, version: Version, data: bytes) -> None:
        self.drop(where)
        if len(data) > self.max_bytes // 4:
            return  # one huge entry must not flush everything else
        self._items[where] = (version, data)
        self.size += len(data)
        while self.size > self.max_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self.size -= len(evicted)

    def drop(self, where: CacheKey) -> None:
        item = self._items.pop(where, None)
        if item is not None:
            self.size -= len(item[1])
