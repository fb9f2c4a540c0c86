"""SessionStore: atomic per-entry writes, validation, symlink refusal, locks, crashes."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from sessionfs import sources
from sessionfs.errors import EntryExists, EntryNotFound, InvalidEntry, InvalidKey, UnsafeEntry
from sessionfs.history import HISTORY_DIR, Actor
from sessionfs.migrate import migrate_source
from sessionfs.store import AsyncSessionStore, EntryChanged, SessionStore, Version
from tests.helpers import entry, entry_bytes


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SessionStore]:
    with SessionStore(tmp_path / "sessions.d") as s:
        yield s


def entry_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def test_write_then_read_is_byte_exact(store: SessionStore) -> None:
    data = b'{ "sessionId":"s1",  "updatedAt": 1.5e12, "zz": {"unknown": [1, "\xc3\xbc"]} }\n'
    store.write("agent:main:main", data)
    snap = store.read("agent:main:main")
    assert snap.data == data
    assert snap.stat.st_size == len(data)
    assert (store.path / "agent%3Amain%3Amain.json").read_bytes() == data


def test_modes(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with SessionStore(tmp_path / "sessions.d") as s:
            s.write("k", entry_bytes())
            assert stat.S_IMODE((tmp_path / "sessions.d").stat().st_mode) == 0o700
            assert stat.S_IMODE((tmp_path / "sessions.d" / "k.json").stat().st_mode) == 0o600
            assert stat.S_IMODE((tmp_path / "sessions.d" / ".lock").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_replace_changes_backing_inode_and_keeps_one_file(store: SessionStore) -> None:
    store.write("k", entry_bytes(updated_at=1))
    first = store.stat("k")
    store.write("k", entry_bytes(updated_at=2))
    assert store.stat("k").st_ino != first.st_ino
    assert sorted(os.listdir(store.path)) == [HISTORY_DIR, ".lock", "k.json"]  # + the old one


@pytest.mark.parametrize(
    ("data", "reason", "code"),
    [
        (b"{", "not valid JSON", errno.EINVAL),
        (b"", "empty", errno.EINVAL),
        (b"  \n", "empty", errno.EINVAL),
        (b"[1, 2]", "JSON object, not an array", errno.EINVAL),
        (b'"x"', "JSON object, not a string", errno.EINVAL),
        (b'{"updatedAt": 1}', '"sessionId"', errno.EINVAL),
        (b'{"sessionId": 7, "updatedAt": 1}', '"sessionId"', errno.EINVAL),
        (b'{"sessionId": "../../etc", "updatedAt": 1}', "must match", errno.EINVAL),
        (b'{"sessionId": "s"}', '"updatedAt"', errno.EINVAL),
        (b'{"sessionId": "s", "updatedAt": "yesterday"}', '"updatedAt"', errno.EINVAL),
        (b'{"sessionId": "s", "updatedAt": true}', '"updatedAt"', errno.EINVAL),
    ],
)
def test_invalid_writes_are_refused_and_old_entry_stays(
    store: SessionStore, data: bytes, reason: str, code: int
) -> None:
    store.write("k", entry_bytes())
    with pytest.raises(InvalidEntry) as info:
        store.write("k", data)
    assert info.value.errno == code
    assert reason in str(info.value)
    assert store.read("k").data == entry_bytes()
    assert sorted(os.listdir(store.path)) == [".lock", "k.json"]  # nothing kept: no change


def test_size_cap_is_efbig(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "sessions.d", max_entry_bytes=1000) as s:
        s.write("k", entry_bytes())
        big = entry_bytes(pad="x" * 1000)
        with pytest.raises(InvalidEntry) as info:
            s.write("k", big)
        assert info.value.errno == errno.EFBIG
        assert "limit is 1000" in str(info.value)
        assert s.read("k").data == entry_bytes()


def test_unvalidated_write_is_for_migration_only(store: SessionStore) -> None:
    store.write("legacy", b'{"sessionId": "s"}', validate=False)
    assert store.read("legacy").data == b'{"sessionId": "s"}'


def test_long_key_is_refused_not_truncated(store: SessionStore) -> None:
    with pytest.raises(InvalidKey) as info:
        store.write("x" * 251, entry_bytes())
    assert info.value.errno == errno.ENAMETOOLONG
    assert entry_files(store.path) == []


def test_symlink_with_entry_name_is_never_followed(store: SessionStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(entry_bytes("secret"))
    os.symlink(outside, store.path / "k.json")
    with pytest.raises(UnsafeEntry, match="symlink"):
        store.read("k")
    with pytest.raises(UnsafeEntry):
        store.write("k", entry_bytes())
    with pytest.raises(UnsafeEntry):
        store.delete("k")
    with pytest.raises(UnsafeEntry):
        store.update("k", lambda e: entry())
    assert outside.read_bytes() == entry_bytes("secret")
    assert (store.path / "k.json").is_symlink()
    assert list(store.keys()) == []


def test_fifo_and_directory_are_not_entries(store: SessionStore) -> None:
    os.mkfifo(store.path / "fifo.json")
    (store.path / "dir.json").mkdir()
    with pytest.raises(UnsafeEntry, match="FIFO"):
        store.read("fifo")  # must not block on open
    with pytest.raises(UnsafeEntry, match="directory"):
        store.read("dir")
    with pytest.raises(UnsafeEntry):
        store.write("dir", entry_bytes())
    assert list(store.keys()) == []


def test_store_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "sessions.d")
    with pytest.raises(UnsafeEntry):
        SessionStore(tmp_path / "sessions.d")


def test_listing_skips_everything_but_entries(store: SessionStore) -> None:
    store.write("agent:main:main", entry_bytes())
    store.write(".dotkey", entry_bytes())
    for junk in (
        ".sfs-0123456789abcdef.tmp",
        "x.json.1234.tmp",
        ".hidden.json",
        "notes.txt",
        "agent:raw.json",
    ):
        (store.path / junk).write_text("{}")
    assert sorted(store.keys()) == [".dotkey", "agent:main:main"]


def test_stray_temps_of_crashed_writers_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "sessions.d"
    path.mkdir()
    old_temp = path / ".sfs-0123456789abcdef.tmp"
    fresh_temp = path / ".sfs-fedcba9876543210.tmp"
    foreign = path / "agent.json.1234.tmp"
    for f in (old_temp, fresh_temp, foreign):
        f.write_text("partial")
    hour_ago = time.time() - 3600
    os.utime(old_temp, (hour_ago, hour_ago))
    os.utime(foreign, (hour_ago, hour_ago))
    with SessionStore(path):
        pass
    assert not old_temp.exists()
    assert fresh_temp.exists()  # might belong to a writer that is still running
    assert foreign.exists()  # not ours


def test_delete_and_rename(store: SessionStore) -> None:
    store.write("a", entry_bytes("a"))
    store.write("b", entry_bytes("b"))
    with pytest.raises(EntryExists):
        store.rename("a", "b", replace=False)
    assert store.read("a").data == entry_bytes("a")
    store.rename("a", "c")
    assert store.read("c").data == entry_bytes("a")
    with pytest.raises(EntryNotFound):
        store.read("a")
    store.rename("c", "b")
    assert store.read("b").data == entry_bytes("a")
    assert sorted(store.keys()) == ["b"]
    assert store.delete("b")
    with pytest.raises(EntryNotFound):
        store.delete("b")
    assert entry_files(store.path) == []


def test_conditional_delete_and_expected_version(store: SessionStore) -> None:
    store.write("k", entry_bytes(updated_at=5))
    assert not store.delete("k", only_if=lambda snap: orjson.loads(snap.data)["updatedAt"] < 5)
    assert store.exists("k")
    seen = Version.of(store.stat("k"))
    store.write("k", entry_bytes(updated_at=6))
    with pytest.raises(EntryChanged) as info:
        store.write("k", entry_bytes(updated_at=7), expected=seen)
    assert info.value.errno == errno.ESTALE
    assert orjson.loads(store.read("k").data)["updatedAt"] == 6
    store.write("k", entry_bytes(updated_at=7), expected=Version.of(store.stat("k")))
    assert orjson.loads(store.read("k").data)["updatedAt"] == 7


def test_update_preserves_unknown_fields(store: SessionStore) -> None:
    store.write("k", entry_bytes(future={"x": [1, None]}))
    store.update("k", lambda e: {**(e or {}), "label": "hi"})
    assert orjson.loads(store.read("k").data) == entry(future={"x": [1, None]}, label="hi")
    created = store.update("new", lambda e: entry("n") if e is None else e)
    assert created == entry("n")
    with pytest.raises(InvalidEntry):
        store.update("k", lambda e: {"no": "id"})


def test_single_entry_operations_never_list_the_store(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One entry's cost must not depend on the store's size: nothing may list it."""
    for i in range(50):
        store.write(f"k{i}", entry_bytes())

    real_scandir = os.scandir
    store_dir = os.stat(store.path)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a single-entry operation listed the store")

    def scandir(path: Any) -> Any:
        st = os.fstat(path) if isinstance(path, int) else os.stat(path)
        if (st.st_dev, st.st_ino) == (store_dir.st_dev, store_dir.st_ino):
            forbidden()
        return real_scandir(path)  # (one key's kept versions: a handful)

    monkeypatch.setattr(os, "listdir", forbidden)
    monkeypatch.setattr(os, "scandir", scandir)
    store.read("k1")
    store.stat("k1")
    store.write("k1", entry_bytes(updated_at=2))
    store.update("k2", lambda e: e or entry())
    store.rename("k3", "k3b")
    store.delete("k4")


def _increment(path: str, count: int) -> None:
    with SessionStore(path) as s:
        for _ in range(count):
            s.update("counter", lambda e: {**(e or entry()), "n": (e or {}).get("n", 0) + 1})


def test_eight_processes_increment_one_key_exactly() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sessions.d")
        SessionStore(path).close()
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_increment, args=(path, 200)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        with SessionStore(path) as s:
            assert orjson.loads(s.read("counter").data)["n"] == 1600


HOLD_LOCK = """
import sys, time
from sessionfs.store import SessionStore
store = SessionStore(sys.argv[1])
with store.locks.hold(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_lock_on_one_key_never_blocks_another(store: SessionStore) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store.path), "A"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"
        assert store.locks.is_held("A")

        a_done = threading.Event()

        def write_a() -> None:
            store.write("A", entry_bytes())
            a_done.set()

        writer_a = threading.Thread(target=write_a)
        writer_a.start()
        store.write("B", entry_bytes())  # completes while A's lock is held elsewhere
        store.update("C", lambda e: entry())
        assert store.read("B").data == entry_bytes()
        assert not a_done.is_set()  # A really waits for its lock
        assert holder.poll() is None
        holder.stdin.write("release\n")
        holder.stdin.flush()
        writer_a.join(10)
        assert a_done.is_set()
    finally:
        holder.kill()
        holder.wait()


async def test_async_face_keeps_the_trio_thread_free(store: SessionStore) -> None:
    astore = AsyncSessionStore(store)
    ticks = 0
    a_written = trio.Event()
    with contextlib.ExitStack() as holding_a:
        holding_a.enter_context(store.locks.hold("A"))
        async with trio.open_nursery() as nursery:

            async def write_a() -> None:
                await astore.write("A", entry_bytes("a"))
                a_written.set()

            nursery.start_soon(write_a)
            await astore.write("B", entry_bytes("b"))
            for _ in range(5):  # the trio loop keeps running while A waits for its lock
                await trio.sleep(0.01)
                ticks += 1
            assert not a_written.is_set()
            holding_a.close()
            with trio.fail_after(10):
                await a_written.wait()
    assert ticks == 5
    assert (await astore.read("A")).data == entry_bytes("a")
    assert sorted(await astore.keys()) == ["A", "B"]


CRASH_WRITER = """
import sys
from sessionfs.store import SessionStore
from tests.helpers import entry_bytes
store = SessionStore(sys.argv[1])
i = 0
while True:
    for key in ("a", "b", "c"):
        store.write(key, entry_bytes(key, updated_at=i, pad="x" * (i % 5000)))
    i += 1
"""


def test_sigkill_at_random_moments_leaves_only_whole_versions(tmp_path: Path) -> None:
    path = tmp_path / "sessions.d"
    SessionStore(path).close()
    rng = random.Random(1234)
    for _ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(path)], cwd=Path(__file__).parent.parent
        )
        time.sleep(rng.uniform(0.15, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = entry_files(path)
        assert set(names) <= {"a.json", "b.json", "c.json"}
        for name in names:
            key = name.removesuffix(".json")
            data = (path / name).read_bytes()
            n = orjson.loads(data)["updatedAt"]
            assert data == entry_bytes(key, updated_at=n, pad="x" * (n % 5000))
    # leftovers are dot-temps only, and a reopened store keeps them until they age
    with SessionStore(path) as s:
        assert sorted(s.keys()) == ["a", "b", "c"]


def test_enospc_keeps_old_entry(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        with SessionStore(mnt / "sessions.d") as s:
            s.write("k", entry_bytes())
            with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
                f.write(b"\0" * 1024 * 1024)
            with pytest.raises(OSError, match="No space") as info:
                s.write("k", entry_bytes(pad="y" * 20000))
            assert info.value.errno == errno.ENOSPC
            assert s.read("k").data == entry_bytes()
            assert entry_files(mnt / "sessions.d") == ["k.json"]
            assert [n for n in os.listdir(mnt / "sessions.d") if n.endswith(".tmp")] == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


USER = 4242  # not root: a gateway's user


def test_root_writing_a_users_store_leaves_every_file_theirs(tmp_path: Path) -> None:
    """sudo sessionfs (a root daemon, a root migrate) on a user's store: entries, the
    lock file, kept versions' directories and the audit belong to the store's owner,
    never root-only files the user's gateway and commands could not open."""
    if os.geteuid() != 0:
        pytest.skip("needs root to write another user's store")
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    os.chown(sessions, USER, USER)
    with SessionStore(sessions / "sessions.d") as store:
        store.write("k", entry_bytes(updated_at=1), actor=Actor(0, 1, "t"))
        store.write("k", entry_bytes(updated_at=2), actor=Actor(0, 1, "t"))
    owners = {
        str(path.relative_to(sessions)): (path.lstat().st_uid, path.lstat().st_gid)
        for path in [sessions / "sessions.d", *(sessions / "sessions.d").rglob("*")]
    }
    assert "sessions.d/.history/audit.jsonl" in owners  # (flushed at close)
    assert set(owners.values()) == {(USER, USER)}, owners


def test_root_migrating_a_users_store_leaves_it_theirs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to write another user's store")
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    (sessions / "sessions.json").write_bytes(
        orjson.dumps({"agent:main:main": {"sessionId": "s1", "updatedAt": 1}})
    )
    for path in (sessions, sessions / "sessions.json"):
        os.chown(path, USER, USER)
    migrate_source(sources.resolve(sessions), progress=None)
    entries = sessions / "sessions.d"
    assert entries.stat().st_uid == USER
    assert {p.stat().st_uid for p in entries.iterdir()} == {USER}
