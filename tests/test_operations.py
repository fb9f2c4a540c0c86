"""The Operations class driven directly, without a mount (as s3ql's unit tests do)."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from sessionfs.fs import Filesystem, Limits
from sessionfs.fs.operations import Operations
from sessionfs.fs.quick import THREAD_NAME, THREADED_SECONDS, QuickCalls
from sessionfs.store import SessionStore, Version
from tests.driving import CTX, Driver, Gates, Replies, make_filesystem
from tests.helpers import entry_bytes


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[SessionStore]:
    (tmp_path / "sessions").mkdir()
    with SessionStore(tmp_path / "sessions" / "sessions.d") as store:
        for key in ("agent:a:main", "cron:1", "hook:100%done"):
            store.write(key, entry_bytes(key.replace(":", "-").replace("%", "p")))
        yield store


@pytest.fixture
def fs(sessions: SessionStore) -> Iterator[Filesystem]:
    filesystem = make_filesystem(sessions.path.parent)
    yield filesystem
    filesystem.index.check()  # every test ends with the invariants holding


@pytest.fixture
def ops(fs: Filesystem) -> Operations:
    return fs.operations


async def lookup_errno(ops: Operations, parent: int, name: bytes) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(parent, name, CTX)
    return info.value.errno


async def test_lookup_counts(ops: Operations) -> None:
    attrs = await ops.lookup(pyfuse3.ROOT_INODE, b"agent:a:main.json", CTX)
    again = await ops.lookup(pyfuse3.ROOT_INODE, b"agent:a:main.json", CTX)
    assert attrs.st_ino == again.st_ino
    node = ops.tree.get(attrs.st_ino)
    assert node.nlookup == 2
    await ops.forget([(attrs.st_ino, 2)])
    assert node.nlookup == 0
    # forgotten, but the key keeps its number
    assert (await ops.lookup(pyfuse3.ROOT_INODE, b"agent:a:main.json", CTX)).st_ino == attrs.st_ino


async def test_names_that_name_no_key(ops: Operations) -> None:
    assert await lookup_errno(ops, pyfuse3.ROOT_INODE, b"%41.json") == errno.ENOENT
    assert await lookup_errno(ops, pyfuse3.ROOT_INODE, b"hook:100%done.json") == errno.ENOENT
    assert (await ops.lookup(pyfuse3.ROOT_INODE, b"hook:100%25done.json", CTX)).st_size > 0
    assert await lookup_errno(ops, pyfuse3.ROOT_INODE, b"x" * 256) == errno.ENAMETOOLONG
    assert await lookup_errno(ops, pyfuse3.ROOT_INODE, b"\xff\xfe.json") == errno.EINVAL


@pytest.mark.expected_log("internal error in lookup")
async def test_unexpected_exception_is_eio_and_logged(
    ops: Operations, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(agent_id: str | None) -> Any:
        raise RuntimeError("disk gremlin")

    catalog = ops.backings.catalog
    good = catalog.backing
    monkeypatch.setattr(catalog, "backing", broken)
    with caplog.at_level(logging.ERROR, logger="sessionfs"):
        assert await lookup_errno(ops, pyfuse3.ROOT_INODE, b"cron:1.json") == errno.EIO
    assert "internal error in lookup(1, cron:1.json); answered EIO" in caplog.text
    assert "RuntimeError: disk gremlin" in caplog.text  # the traceback is in the log
    monkeypatch.setattr(catalog, "backing", good)
    assert (await ops.lookup(pyfuse3.ROOT_INODE, b"cron:1.json", CTX)).st_size > 0


async def test_readdir_offsets_survive_inserts_and_deletes(
    ops: Operations, sessions: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        sessions.write(f"k{i:02}", entry_bytes())
    fh = await ops.opendir(pyfuse3.ROOT_INODE, CTX)
    first = Replies(room=5)
    monkeypatch.setattr(pyfuse3, "readdir_reply", first)
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    # the store changes between two readdir calls of one listing
    sessions.write("zz-new", entry_bytes())
    sessions.delete("k19")
    rest = Replies(room=1000)
    monkeypatch.setattr(pyfuse3, "readdir_reply", rest)
    await ops.readdir(fh, first.next_ids[-1], None)  # type: ignore[arg-type]
    await ops.releasedir(fh)
    names = first.names + rest.names
    assert len(names) == len(set(names))
    everything_kept = {f"k{i:02}.json" for i in range(19)} | {
        "agent:a:main.json",
        "cron:1.json",
        "hook:100%25done.json",
    }
    assert everything_kept <= set(names)
    # each entry the kernel accepted holds one lookup reference (k19 went meanwhile:
    # POSIX leaves it open whether a listing in progress still shows it)
    for name in names:
        if name.endswith(".json") and name != "k19.json":
            node = ops.tree.get((await ops.lookup(pyfuse3.ROOT_INODE, name.encode(), CTX)).st_ino)
            assert node.nlookup == 2


async def test_read_sees_the_version_of_its_open(ops: Operations, sessions: SessionStore) -> None:
    ino = (await ops.lookup(pyfuse3.ROOT_INODE, b"cron:1.json", CTX)).st_ino
    info = await ops.open(ino, 0, CTX)
    assert info.direct_io  # never the kernel's shared pages: each read carries its handle
    sessions.write("cron:1", entry_bytes("other", pad="p" * 100))
    assert await ops.read(info.fh, 0, 4096) == entry_bytes("cron-1")
    second = await ops.open(ino, 0, CTX)
    assert await ops.read(second.fh, 0, 4096) == entry_bytes("other", pad="p" * 100)
    assert await ops.read(info.fh, 0, 4096) == entry_bytes("cron-1")  # still its own version
    for handle in (info, second):
        await ops.release(handle.fh)
    assert ops.editing.handles == {}


def test_commit_decisions() -> None:
    from sessionfs.fs.handles import Handle, is_scratch_name
    from sessionfs.fs.tree import File

    node = File(10, key="k")
    redirect = Handle(1, node, os.O_WRONLY | os.O_TRUNC, b"old", key="k")
    redirect.truncate_at_open()
    assert not redirect.should_commit(final=False)  # the shell's first flush: nothing written yet
    assert redirect.should_commit(final=True)  # closed without writing: try (and be refused)
    redirect.write(0, b"{}", limit=100)
    assert redirect.should_commit(final=False)
    redirect.committed(Version(1, 1, 2))
    assert not redirect.should_commit(final=False)  # one commit per change, not per flush

    editor = Handle(2, node, os.O_WRONLY, b"old", key="k")
    assert not editor.should_commit(final=True)
    editor.truncate(0, limit=100)  # an explicit ftruncate(0) is a change of its own
    assert editor.should_commit(final=False)

    appender = Handle(3, node, os.O_WRONLY | os.O_APPEND, b"ab", key="k")
    appender.write(0, b"c", limit=100)
    assert appender.data == b"abc"
    reader = Handle(4, node, os.O_RDONLY, b"x")
    assert not reader.should_commit(final=True)

    for name in (".x.json.swp", "4913", "sedAbC123", "x.tmp", "x.json~", "#x.json#", ".#x.json"):
        assert is_scratch_name(name)
    assert not is_scratch_name("agent:main:main.json")


async def test_scratch_files_are_bounded(sessions: SessionStore) -> None:
    limits = Limits(max_entry_bytes=1 << 20, scratch_bytes=100)
    ops = make_filesystem(sessions.path.parent, limits=limits).operations
    ctx = CTX
    first, _ = await ops.create(pyfuse3.ROOT_INODE, b"a.tmp", 0o600, os.O_WRONLY, ctx)
    await ops.write(first.fh, 0, b"x" * 60)
    second, _ = await ops.create(pyfuse3.ROOT_INODE, b"b.tmp", 0o600, os.O_WRONLY, ctx)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.write(second.fh, 0, b"y" * 60)
    assert info.value.errno == errno.ENOSPC
    await ops.release(first.fh)
    await ops.unlink(pyfuse3.ROOT_INODE, b"a.tmp", ctx)
    assert await ops.write(second.fh, 0, b"y" * 60) == 60  # room again once it is gone
    await ops.release(second.fh)
    assert sorted(os.listdir(sessions.path)) == [
        ".lock",
        "agent%3Aa%3Amain.json",
        "cron%3A1.json",
        "hook%3A100%25done.json",
    ]  # scratch files never reach the store


async def test_oversized_entry_is_efbig_and_listed(sessions: SessionStore) -> None:
    ops = make_filesystem(sessions.path.parent, limits=Limits(max_entry_bytes=50)).operations
    ino = (await ops.lookup(pyfuse3.ROOT_INODE, b"cron:1.json", CTX)).st_ino
    info = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.write(info.fh, 0, b"z" * 60)
    assert raised.value.errno == errno.EFBIG
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.flush(info.fh)
    assert raised.value.errno == errno.EFBIG
    await ops.release(info.fh)
    assert sessions.read("cron:1").data == entry_bytes("cron-1")
    assert (
        "cron:1.json  EFBIG  entry would exceed 50 bytes"
        in ops.editing.rejections.render().decode()
    )


def test_content_cache_is_bounded_and_version_keyed() -> None:
    from sessionfs.fs.cache import ContentCache

    cache = ContentCache(max_bytes=100)
    v1, v2 = Version(1, 1, 10), Version(2, 2, 10)
    cache.put((1, "a"), v1, b"a" * 10)
    assert cache.get((1, "a"), v1) == b"a" * 10
    assert cache.get((1, "a"), v2) is None  # another version is never served
    cache.put((1, "a"), v2, b"b" * 10)
    assert cache.get((1, "a"), v1) is None
    assert cache.size == 10
    for ino in range(2, 12):
        cache.put((ino, "a"), v1, b"c" * 10)
    assert cache.size <= 100
    assert cache.get((1, "a"), v2) is None  # the least recently used went first
    cache.put((99, "a"), v1, b"x" * 30)  # over a quarter of the budget: not kept
    assert cache.get((99, "a"), v1) is None


class _TimedGates(Gates):
    """Records the thread of each store write and stat; makes the next write *slow*."""

    def __init__(self) -> None:
        super().__init__()
        self.write_threads: list[str] = []
        self.stat_threads: list[str] = []
        self.slow = 0.0

    def pause(self, point: str) -> None:
        if point == "in stat_many":
            self.stat_threads.append(threading.current_thread().name)
        if point == "before write":
            self.write_threads.append(threading.current_thread().name)
            slow, self.slow = self.slow, 0.0
            time.sleep(slow)


async def test_an_updates_calls_skip_the_hop_but_never_hold_up_the_mount(
    sessions: SessionStore, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sessionfs")
    gates = _TimedGates()
    # thresholds far above any real fsync, so only the test's sleeps are slow
    quick = QuickCalls(wait_seconds=0.5, slow_seconds=0.2)  # (set lower for the hang below)
    fs = make_filesystem(sessions.path.parent, gates, quick=quick)
    fs.index.watch(None)
    drive = Driver(fs, pytest.MonkeyPatch())
    root = fs.operations.tree.root

    async def commit(version: str) -> str:
        await drive.write("cron:1.json", entry_bytes(version))
        assert sessions.read("cron:1").data == entry_bytes(version)
        return gates.write_threads[-1]

    assert await commit("fast") == THREAD_NAME  # no trio thread hop while the disk is fast
    await fs.index.refresh(root, ["cron:1"], event=True)  # as after the commit's event
    assert gates.stat_threads[-1] == THREAD_NAME

    # a disk that hangs: the trio thread waits 0.1 s at most, then serves everyone
    # else while the commit still runs; a commit of another key meanwhile goes to a
    # worker thread, never behind the hung one
    quick.wait_seconds = 0.1
    gates.slow = 1.5

    def trio_latency_later() -> float:
        """From another thread, 0.3 s into the hang: how long trio takes to answer."""
        time.sleep(0.3)
        asked = time.perf_counter()
        trio.from_thread.run_sync(lambda: None)
        return time.perf_counter() - asked

    async with trio.open_nursery() as writers:
        writers.start_soon(commit, "hung-disk")
        assert await trio.to_thread.run_sync(trio_latency_later) < 0.3  # not held 1.5 s
        hung_in = gates.write_threads[-1]
        await drive.write("hook:100%25done.json", entry_bytes("meanwhile"))
        assert gates.write_threads[-1] != THREAD_NAME  # not queued behind the hung call
        assert sessions.read("hook:100%done").data == entry_bytes("meanwhile")
    assert hung_in == THREAD_NAME
    quick.wait_seconds = 0.5
    # one slow call (a journal flush, cold metadata) is not a slow disk: three of the
    # last eight are, and then every call goes to worker threads for a while
    assert await commit("fast-again") == THREAD_NAME
    gates.slow = 0.3  # slow, though done within the wait
    assert await commit("slow-2") == THREAD_NAME
    assert "the disk is slow" not in caplog.text
    gates.slow = 0.3
    assert await commit("slow-3") == THREAD_NAME
    assert "a write took 30" in caplog.text
    assert "worker threads for 60 s" in caplog.text
    assert await commit("threaded") != THREAD_NAME
    mock_clock.jump(THREADED_SECONDS)  # that while is over
    assert await commit("quick-again") == THREAD_NAME
    for version in ("slow-4", "slow-5", "slow-6"):  # slow again within its period:
        gates.slow = 0.3
        assert await commit(version) == THREAD_NAME
    mock_clock.jump(THREADED_SECONDS)
    assert await commit("still-threaded") != THREAD_NAME  # twice as long
    mock_clock.jump(THREADED_SECONDS)
    assert await commit("fast-at-last") == THREAD_NAME


async def test_readdir_never_replies_a_transcript_whose_session_was_renamed(
    ops: Operations, sessions: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, sid in (("cron:a", "s-a"), ("cron:b", "s-b")):
        sessions.write(key, entry_bytes(sid))
        (sessions.path.parent / f"{sid}.jsonl").write_bytes(b'{"type":"session"}\n')
    fh = await ops.opendir(pyfuse3.ROOT_INODE, CTX)
    first = Replies(room=1)
    monkeypatch.setattr(pyfuse3, "readdir_reply", first)
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    assert "cron:b.jsonl" not in first.names
    # renamed between two readdir calls of one listing: its transcript goes with it
    await ops.lookup(pyfuse3.ROOT_INODE, b"cron:b.json", CTX)  # as the kernel does first
    await ops.rename(pyfuse3.ROOT_INODE, b"cron:b.json", pyfuse3.ROOT_INODE, b"cron:z.json", 0, CTX)
    rest = Replies()
    monkeypatch.setattr(pyfuse3, "readdir_reply", rest)
    await ops.readdir(fh, first.next_ids[-1], None)  # type: ignore[arg-type]
    await ops.releasedir(fh)
    assert "cron:a.jsonl" in rest.names
    assert "cron:b.jsonl" not in rest.names
    assert "cron:b.json" not in rest.names
