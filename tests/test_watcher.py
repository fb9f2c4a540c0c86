"""Writers behind the mount: changes show within 100 ms; otherwise the kernel cache holds."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from sessionfs.store import SessionStore
from tests.helpers import entry_bytes, raises_errno
from tests.mounting import Mount, mounted, wait_for

pytestmark = pytest.mark.fuse

VISIBLE_WITHIN = 0.1  # seconds: the promise for changes behind the mount
KEY, NAME, BACKING = "agent:main:main", "agent:main:main.json", "agent%3Amain%3Amain.json"


@pytest.fixture
def mnt(state_dir: Path, tmp_path: Path) -> Iterator[Mount]:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        yield mount


@pytest.fixture
def store(state_dir: Path) -> Iterator[SessionStore]:
    with SessionStore(state_dir / "agents/main/sessions/sessions.d") as s:
        yield s


def stats(mount: Mount) -> dict[str, dict[str, int]]:
    since_mount: dict[str, dict[str, int]] = mount.stats()["since_mount"]
    return since_mount


def disk_reads(mount: Mount) -> int:
    return stats(mount)["store_calls"].get("read", 0)


def test_replaced_entry_shows_within_100ms(mnt: Mount, store: SessionStore) -> None:
    path = mnt.path / "main" / NAME
    before = path.stat()
    path.read_bytes()  # now in the kernel's caches
    for i in range(5):
        new = entry_bytes(f"outside-{i}", pad="p" * (i * 300))
        store.write(KEY, new)
        wait_for(_shows(path, new), timeout=VISIBLE_WITHIN, what="the new content")
        st, backing = path.stat(), (store.path / BACKING).stat()
        assert st.st_size == len(new)
        assert st.st_mtime_ns == backing.st_mtime_ns
        assert st.st_ino == before.st_ino  # same key, same inode number


def test_plain_os_replace_shows_within_100ms(mnt: Mount, store: SessionStore) -> None:
    path = mnt.path / "main" / NAME
    path.read_bytes()
    temp = store.path / "tmp.write"
    temp.write_bytes(entry_bytes("replaced-by-os"))
    os.replace(temp, store.path / BACKING)
    wait_for(
        lambda: path.read_bytes() == entry_bytes("replaced-by-os"),
        timeout=VISIBLE_WITHIN,
        what="the replaced content",
    )
    (store.path / BACKING).write_bytes(entry_bytes("written-in-place"))  # an in-place writer
    wait_for(
        lambda: path.read_bytes() == entry_bytes("written-in-place"),
        timeout=VISIBLE_WITHIN,
        what="the rewritten content",
    )


def test_created_and_deleted_entries_show_within_100ms(mnt: Mount, store: SessionStore) -> None:
    agent = mnt.path / "main"
    assert not (agent / "cron:new.json").exists()
    store.write("cron:new", entry_bytes("new"))
    wait_for((agent / "cron:new.json").exists, timeout=VISIBLE_WITHIN, what="the new entry")
    assert "cron:new.json" in os.listdir(agent)
    assert (agent / "cron:new.json").read_bytes() == entry_bytes("new")
    (agent / NAME).read_bytes()
    store.delete(KEY)
    wait_for(lambda: not (agent / NAME).exists(), timeout=VISIBLE_WITHIN, what="the deletion")
    assert NAME not in os.listdir(agent)
    with raises_errno(errno.ENOENT):
        (agent / NAME).read_bytes()
    os.unlink(store.path / "cron%3Anew.json")  # a plain unlink behind the mount
    wait_for(
        lambda: not (agent / "cron:new.json").exists(), timeout=VISIBLE_WITHIN, what="the unlink"
    )


def test_agents_come_and_go(mnt: Mount, state_dir: Path) -> None:
    sessions = state_dir / "agents/ops/sessions"
    sessions.mkdir(parents=True)
    with SessionStore(sessions / "sessions.d") as store:
        store.write("agent:ops:main", entry_bytes("ops"))
    wait_for((mnt.path / "ops" / "agent:ops:main.json").exists, timeout=1, what="the new agent")
    shutil.rmtree(state_dir / "agents/ops")
    wait_for(lambda: not (mnt.path / "ops").exists(), timeout=1, what="the agent to go")
    assert "ops" not in os.listdir(mnt.path)


def test_unchanged_session_is_reread_without_disk_io(mnt: Mount, store: SessionStore) -> None:
    path = mnt.path / "main" / NAME
    start = disk_reads(mnt)
    first = path.read_bytes()
    assert disk_reads(mnt) == start + 1
    for _ in range(3):
        assert path.read_bytes() == first
    assert disk_reads(mnt) == start + 1  # the daemon's content cache answered
    store.write(KEY, entry_bytes("changed"))
    wait_for(
        lambda: path.read_bytes() == entry_bytes("changed"),
        timeout=VISIBLE_WITHIN,
        what="the change",
    )
    assert disk_reads(mnt) > start + 1  # a changed entry is read again


def watcher_stats(mount: Mount) -> int:
    calls = stats(mount)["store_calls"]
    return calls.get("stat", 0) + calls.get("stat (quick)", 0)


def test_own_commits_cost_no_invalidation(mnt: Mount, store: SessionStore) -> None:
    path = mnt.path / "main" / NAME
    path.write_bytes(entry_bytes("mine"))
    time.sleep(0.2)
    stats_before = watcher_stats(mnt)
    for i in range(5):
        path.write_bytes(entry_bytes(f"mine-{i}"))
    time.sleep(0.2)
    # the watcher tells their renames by the temp names, and needs no stat for them
    assert watcher_stats(mnt) == stats_before
    assert stats(mnt)["watcher"]["own_renames"] >= 5
    (mnt.path / "main" / "cron:mine.json").write_bytes(entry_bytes("created"))
    os.rename(mnt.path / "main" / "cron:mine.json", mnt.path / "main" / "cron:moved.json")
    os.unlink(mnt.path / "main" / "cron:moved.json")
    time.sleep(0.2)  # give any event time to arrive: none of them may invalidate anything
    assert stats(mnt)["watcher"]["invalidations"] == 0
    store.write(KEY, entry_bytes("outside"))
    wait_for(
        lambda: stats(mnt)["watcher"]["invalidations"] == 1, timeout=1, what="one invalidation"
    )


def _shows(path: Path, data: bytes) -> Callable[[], bool]:
    return lambda: path.read_bytes() == data


def test_queue_overflow_triggers_a_rescan(mnt: Mount, store: SessionStore) -> None:
    keys = [f"cron:k{i}" for i in range(20)]
    for key in keys:
        store.write(key, entry_bytes("before"))
    for key in keys:
        assert (mnt.path / "main" / f"{key}.json").read_bytes() == entry_bytes("before")
    # Stop the daemon while more events pile up than its inotify queue holds
    # (each write makes three: the temp's close and rename, and the entry's arrival).
    queue = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    writes = queue // 2
    os.kill(mnt.pid, signal.SIGSTOP)
    try:
        for n in range(writes):
            store.write(keys[n % len(keys)], entry_bytes(f"after-{n}"), durable=False)
    finally:
        os.kill(mnt.pid, signal.SIGCONT)
    final = {keys[n % len(keys)]: entry_bytes(f"after-{n}") for n in range(writes)}
    for key, data in final.items():
        path = mnt.path / "main" / f"{key}.json"
        wait_for(_shows(path, data), timeout=2, what=f"{key} after the overflow")
    assert stats(mnt)["watcher"]["rescans"] >= 1
    assert "inotify queue overflowed; rescanning" in mnt.log_text()


def test_replaced_sessions_d_is_followed(mnt: Mount, state_dir: Path) -> None:
    sessions = state_dir / "agents/main/sessions"
    path = mnt.path / "main" / NAME
    path.read_bytes()
    staged = sessions / "sessions.d.new"
    staged.mkdir()
    with SessionStore(staged) as store:
        store.write(KEY, entry_bytes("from-the-new-dir"))
    os.rename(sessions / "sessions.d", sessions / "sessions.d.old")
    os.rename(staged, sessions / "sessions.d")
    wait_for(
        lambda: path.read_bytes() == entry_bytes("from-the-new-dir"),
        timeout=1,
        what="the entry of the new sessions.d",
    )
    assert os.listdir(mnt.path / "main") == [NAME]
    # and the new directory is watched as well
    with SessionStore(sessions / "sessions.d") as store:
        store.write(KEY, entry_bytes("later"))
    wait_for(
        lambda: path.read_bytes() == entry_bytes("later"),
        timeout=VISIBLE_WITHIN,
        what="a later change",
    )


def _edit_while_replaced_behind(mount: Mount, store: SessionStore) -> None:
    with open(mount.path / "main" / NAME, "r+b") as f:
        f.read()
        store.write(KEY, entry_bytes("outside"))
        f.seek(0)
        f.truncate()
        f.write(entry_bytes("inside"))


def test_conflict_later_commit_wins_and_is_logged(mnt: Mount, store: SessionStore) -> None:
    _edit_while_replaced_behind(mnt, store)
    assert (store.path / BACKING).read_bytes() == entry_bytes("inside")
    assert f"conflict on main/{NAME}: it changed behind the mount" in mnt.log_text()


def test_conflict_fail_mode_keeps_the_outside_version(state_dir: Path, tmp_path: Path) -> None:
    with (
        mounted(state_dir, tmp_path / "mnt", "-o", "conflict=fail") as mount,
        SessionStore(state_dir / "agents/main/sessions/sessions.d") as store,
    ):
        with raises_errno(errno.ESTALE):
            _edit_while_replaced_behind(mount, store)
        assert (store.path / BACKING).read_bytes() == entry_bytes("outside")
        errors = (mount.path / ".sessionfs" / "errors").read_text()
        assert f"main/{NAME}  ESTALE  changed behind the mount since it was opened" in errors
        # an edit that saw the current version commits normally
        (mount.path / "main" / NAME).write_bytes(entry_bytes("after"))
        assert (store.path / BACKING).read_bytes() == entry_bytes("after")


def test_file_watchers_on_the_mount_see_its_own_writes_not_the_gateways(
    mnt: Mount, store: SessionStore
) -> None:
    """What the README says about inotifywait on the mount: a FUSE limit, held here.

    The kernel raises inotify events for what passes through its VFS on the mount; a
    write behind it reaches the mount only as a cache invalidation, which raises none.
    The store itself (sessions.d/) is where to watch for the gateway.
    """
    with INotify() as on_mount, INotify() as on_store:
        on_mount.add_watch(mnt.path / "main", flags.CLOSE_WRITE | flags.MOVED_TO)
        on_store.add_watch(store.path, flags.CLOSE_WRITE | flags.MOVED_TO)
        (mnt.path / "main" / NAME).write_bytes(entry_bytes("through-the-mount"))
        assert NAME in {event.name for event in on_mount.read(timeout=1000)}
        on_store.read(timeout=200)  # the daemon's own commit, seen behind the mount
        store.write(KEY, entry_bytes("behind-the-mount"))
        assert BACKING in {event.name for event in on_store.read(timeout=1000)}
        wait_for(_shows(mnt.path / "main" / NAME, entry_bytes("behind-the-mount")))
        assert on_mount.read(timeout=300) == []
