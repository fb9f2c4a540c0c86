"""A reader sees one whole committed version: stress and mounted coherence tests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionfs.store import SessionStore
from tests.helpers import entry_bytes
from tests.mounting import Mount, mounted

pytestmark = pytest.mark.fuse

KEY, NAME = "agent:main:main", "agent:main:main.json"
STRESS_SECONDS = 2.5


@pytest.fixture
def mnt(state_dir: Path, tmp_path: Path) -> Iterator[Mount]:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        yield mount


class Versions:
    """Every version any writer may have committed, by content and by size."""

    def __init__(self, first: bytes) -> None:
        self.lock = threading.Lock()
        self.contents = {first}
        self.sizes = {len(first)}

    def add(self, data: bytes) -> bytes:
        with self.lock:
            self.contents.add(data)
            self.sizes.add(len(data))
        return data


def _version(writer: str, n: int) -> bytes:
    # sizes alternate between ~50 B and ~3 KB, as a gateway's entries do
    pad = "s" if n % 2 else "L" * (3000 + n % 7)
    return entry_bytes(f"{writer}-{n}", updated_at=n, pad=pad)


def _read_whole(path: Path) -> bytes:
    """Read as cat does: big reads until end of file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 128 * 1024):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def test_readers_see_only_whole_committed_versions(mnt: Mount, state_dir: Path) -> None:
    """An outside writer, a writer through the mount and two readers on one entry."""
    store_dir = state_dir / "agents/main/sessions/sessions.d"
    path = mnt.path / "main" / NAME
    versions = Versions(path.read_bytes())
    stop = time.monotonic() + STRESS_SECONDS
    bad: list[str] = []
    reads = [0]

    def outside() -> None:
        with SessionStore(store_dir) as store:
            n = 0
            while time.monotonic() < stop:
                store.write(KEY, versions.add(_version("outside", n)), durable=False)
                n += 1

    def through_mount() -> None:
        n = 0
        while time.monotonic() < stop:
            data = versions.add(_version("inside", n))
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                half = len(data) // 2
                os.write(fd, data[:half])
                os.write(fd, data[half:])
            finally:
                os.close(fd)
            n += 1

    def reader() -> None:
        while time.monotonic() < stop:
            size = os.stat(path).st_size
            data = _read_whole(path)
            reads[0] += 1
            with versions.lock:
                if data not in versions.contents:
                    bad.append(f"read {len(data)} bytes that no writer committed: {data[:60]!r}")
                if size not in versions.sizes:
                    bad.append(f"stat said {size} bytes, the size of no committed version")

    threads = [threading.Thread(target=fn) for fn in (outside, through_mount, reader, reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reads[0] > 50
    torn = sum(1 for line in bad if line.startswith("read"))
    assert not bad, f"{torn} torn reads, {len(bad) - torn} bad stats in {reads[0]}: {bad[:5]}"
