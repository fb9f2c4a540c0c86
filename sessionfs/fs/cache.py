"""Bytes of recently read entry versions, so reopening an unchanged session needs no I/O.

Keyed by inode and version: a new version never matches an old one, so nothing
here can be served stale; the watcher only makes entries useless, never wrong.
"""

from __future__ import annotations

from collections import OrderedDict

from ..store import Version

DEFAULT_CONTENT_CACHE_BYTES = 32 * 1024 * 1024


class ContentCache:
    """A least-recently-used map of (inode, version) -> bytes, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CONTENT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[int, tuple[Version, bytes]] = OrderedDict()

    def get(self, ino: int, version: Version) -> bytes | None:
        item = self._items.get(ino)
        if item is None or item[0] != version:
            return None
        self._items.move_to_end(ino)
        return item[1]

    def put(self, ino: int, version: Version, data: bytes) -> None:
        self.drop(ino)
        if len(data) > self.max_bytes // 4:
            return  # one huge entry must not flush everything else
        self._items[ino] = (version, data)
        self.size += len(data)
        while self.size > self.max_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self.size -= len(evicted)

    def drop(self, ino: int) -> None:
        item = self._items.pop(ino, None)
        if item is not None:
            self.size -= len(item[1])
