"""Editing semantics and the index's ordering rule, without a mount.

Race tests pause a store call inside its worker thread (a :class:`Gate`), let an
outside writer and the watcher act, resume, and check what the mount then shows.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pyfuse3
import pytest
import trio
import trio.testing
from inotify_simple import flags

from sessionfs import store as store_module
from sessionfs.catalog import WatchTarget
from sessionfs.fs import CONFLICT_FAIL, Filesystem, Limits
from sessionfs.fs.tree import Dir
from sessionfs.fs.watcher import _Watch
from sessionfs.keys import key_to_filename
from sessionfs.store import SessionStore
from tests.driving import CTX, Clock, Driver, Gates, fields, make_filesystem, size_of
from tests.helpers import entry_bytes

KEY, NAME = "cron:1", "cron:1.json"
OTHER, OTHER_NAME = "cron:2", "cron:2.json"
ORIGINAL = entry_bytes("original")


@pytest.fixture
def sessions_dir(tmp_path: Path) -> Path:
    (tmp_path / "sessions").mkdir()
    return tmp_path / "sessions"


@pytest.fixture
def store(sessions_dir: Path) -> Iterator[SessionStore]:
    """The store as the gateway sees it (another SessionStore, as another process has)."""
    with SessionStore(sessions_dir / "sessions.d") as store:
        store.write(KEY, ORIGINAL)
        store.write(OTHER, entry_bytes("other"))
        yield store


@pytest.fixture
def gates() -> Gates:
    return Gates()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def watched(fs: Filesystem) -> Filesystem:
    """As in a mount: the watcher keeps the index, so lookups answer from memory."""
    fs.index.watch(None)
    return fs


@pytest.fixture
def fs(store: SessionStore, gates: Gates, clock: Clock) -> Iterator[Filesystem]:
    filesystem = watched(make_filesystem(store.path.parent, gates, clock))
    yield filesystem
    filesystem.index.check()  # every test ends with the invariants holding


@pytest.fixture
def drive(fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> Driver:
    return Driver(fs, monkeypatch)


async def settled(fs: Filesystem) -> None:
    """What the watcher would do after every change: look at every key again."""
    root = fs.operations.tree.root
    await fs.index.refresh(root, sorted(root.known))
    fs.index.check()


async def shows(drive: Driver, name: str, data: bytes) -> None:
    """The mount shows *data* under *name*: in stat, in the listing and in a fresh read."""
    assert (await drive.lookup(name)).st_size == len(data)  # before a read could correct it
    assert name in await drive.listdir()
    assert await drive.read(name) == data


async def while_paused(
    gates: Gates, point: str, call: object, meanwhile: object, *, queued: bool = False
) -> None:
    """Run *call* until its store call reaches *point*; run *meanwhile*; then let it finish.

    With *queued*, *meanwhile* is an operation on the same key, which waits its
    turn behind *call*: it is started, left waiting, and finishes after *call*.
    """
    gate = gates.arm(point)
    errors: list[BaseException] = []

    async def run(fn: object) -> None:
        try:
            await fn()  # type: ignore[operator]
        except pyfuse3.FUSEError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, call)
        await trio.to_thread.run_sync(gate.reached.wait)
        if queued:
            nursery.start_soon(run, meanwhile)
            await trio.testing.wait_all_tasks_blocked(cushion=0.02)
        else:
            await meanwhile()  # type: ignore[operator]
        gate.go.set()
    if errors:
        raise errors[0]


# -- the index's ordering rule -------------------------------------------------


async def test_commit_racing_an_outside_write_shows_the_outside_version(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    """The gateway writes between our rename and the commit's continuation."""
    await drive.listdir()  # the index is complete, as in a mount
    outside = entry_bytes("outside", pad="o" * 500)

    async def gateway_writes() -> None:
        store.write(KEY, outside)
        await settled(fs)  # the watcher sees it before the commit's continuation runs

    await while_paused(
        gates, "after write", lambda: drive.write(NAME, entry_bytes("mine")), gateway_writes
    )
    await shows(drive, NAME, outside)
    fs.index.check()


async def test_conflict_fail_shows_the_outside_version_that_raced_the_lock(
    store: SessionStore, gates: Gates, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = watched(make_filesystem(store.path.parent, gates, clock, conflict=CONFLICT_FAIL))
    drive = Driver(fs, monkeypatch)
    await drive.listdir()
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    await fs.operations.write(fh, 0, entry_bytes("mine"))
    outside = entry_bytes("outside", pad="o" * 300)

    async def gateway_writes() -> None:
        store.write(KEY, outside)  # while our commit waits to take the key's lock
        await settled(fs)

    with pytest.raises(pyfuse3.FUSEError) as raised:
        await while_paused(gates, "before write", lambda: fs.operations.flush(fh), gateway_writes)
    assert raised.value.errno == errno.ESTALE
    await fs.operations.release(fh)
    assert store.read(KEY).data == outside
    await shows(drive, NAME, outside)


async def test_unlink_racing_a_recreation_shows_the_recreated_entry(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    await drive.listdir()
    recreated = entry_bytes("recreated", pad="r" * 200)

    async def gateway_recreates() -> None:
        store.write(KEY, recreated)
        await settled(fs)

    await while_paused(gates, "after remove", lambda: drive.unlink(NAME), gateway_recreates)
    await shows(drive, NAME, recreated)


async def test_rename_racing_an_outside_write_shows_it(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    await drive.listdir()
    outside = entry_bytes("outside", pad="x" * 250)

    async def gateway_writes() -> None:
        store.write("cron:3", outside)
        await settled(fs)
        await fs.index.refresh(fs.operations.tree.root, ["cron:3"])

    await while_paused(
        gates, "after rename", lambda: drive.rename(NAME, "cron:3.json"), gateway_writes
    )
    await shows(drive, "cron:3.json", outside)
    assert not await drive.exists(NAME)


async def test_own_commit_seen_first_by_the_watcher_is_not_an_outside_change(
    fs: Filesystem, drive: Driver, gates: Gates
) -> None:
    await drive.listdir()
    await while_paused(
        gates, "after write", lambda: drive.write(NAME, entry_bytes("mine")), lambda: settled(fs)
    )
    await drive.unlink(OTHER_NAME)
    await settled(fs)
    assert fs.index.outside_changes == 0
    assert fs.kernel.invalidations == 0
    await shows(drive, NAME, entry_bytes("mine"))


async def test_watcher_stat_taken_before_our_rename_does_not_hide_our_commit(
    fs: Filesystem, drive: Driver, gates: Gates, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher's stat (of the previous commit's event) starts during our commit,
    so its stamp is newer, but it ran before our rename and saw the version we replace.
    Seen in a loop of updates: the next open then took that old version as its base
    and its commit logged a false conflict (``-o conflict=fail``: ESTALE)."""
    await drive.listdir()
    mine = entry_bytes("mine", pad="m" * 400)
    await while_paused(gates, "before write", lambda: drive.write(NAME, mine), lambda: settled(fs))
    assert (await drive.lookup(NAME)).st_size == len(mine)
    await drive.write(NAME, entry_bytes("next"))
    assert "conflict" not in caplog.text
    assert fs.index.outside_changes == 0
    await shows(drive, NAME, entry_bytes("next"))


async def test_outside_write_learnt_during_our_commit_is_kept(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    """The other side of the rule above: a version newer than ours, learnt while our
    commit's continuation had not yet run, stays what the mount shows."""
    await drive.listdir()
    outside = entry_bytes("outside", pad="o" * 300)

    async def gateway_writes_after_our_rename() -> None:
        store.write(KEY, outside)
        await settled(fs)

    await while_paused(
        gates,
        "after write",
        lambda: drive.write(NAME, entry_bytes("mine")),
        gateway_writes_after_our_rename,
    )
    await shows(drive, NAME, outside)


async def test_outside_changes_are_told_once(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    await drive.listdir()
    store.write(KEY, entry_bytes("outside"))
    await settled(fs)
    await settled(fs)
    assert fs.kernel.invalidations == 1


# -- refusals leave the old entry in every view ---------------------------------


async def test_refused_write_shows_the_old_entry(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    # `jq ... f > f` whose jq failed: the empty commit is tried at release, which
    # cannot report it (the shell exits 0); it is refused and listed
    await drive.write(NAME, b"")
    assert fs.editing.rejections.total == 1
    await shows(drive, NAME, ORIGINAL)
    assert store.read(KEY).data == ORIGINAL


async def test_uncommitted_bytes_are_never_seen_by_another_handle(
    fs: Filesystem, drive: Driver
) -> None:
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    await fs.operations.write(fh, 0, b"{half")
    assert await drive.read(NAME) == ORIGINAL
    assert (await drive.lookup(NAME)).st_size == len(ORIGINAL)
    await fs.operations.release(fh)  # refused at release: nothing changed
    await shows(drive, NAME, ORIGINAL)


async def test_refused_truncate_shows_the_old_entry(fs: Filesystem, drive: Driver) -> None:
    fh = await drive.open(NAME, os.O_WRONLY)
    ino = (await drive.lookup(NAME)).st_ino
    attrs = await fs.operations.setattr(ino, size_of(10), fields(update_size=True), fh, CTX)
    assert attrs.st_size == len(ORIGINAL)  # the kernel learns the committed size, not 10
    with pytest.raises(pyfuse3.FUSEError):
        await drive.close(fh)
    await shows(drive, NAME, ORIGINAL)


async def test_identical_write_makes_no_new_version(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    before = store.stat(KEY)
    await drive.write(NAME, ORIGINAL)
    after = store.stat(KEY)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# -- editor saves ------------------------------------------------------------


@pytest.mark.parametrize("conflict", ["lww", "fail"])
async def test_editor_save_is_one_change_not_a_conflict(
    store: SessionStore,
    gates: Gates,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    conflict: str,
) -> None:
    fs = watched(make_filesystem(store.path.parent, gates, clock, conflict=conflict))
    drive = Driver(fs, monkeypatch)
    with caplog.at_level(logging.INFO, logger="sessionfs"):
        await drive.editor_save(NAME, entry_bytes("vim"))
        await drive.rename(NAME, f"{NAME}~")  # emacs: mv K K~; cp new K
        await drive.write(NAME, entry_bytes("emacs"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert "conflict" not in caplog.text
    assert store.read(KEY).data == entry_bytes("emacs")
    await shows(drive, NAME, entry_bytes("emacs"))
    clock.now += 10
    await fs.graces.expire()
    assert store.read(KEY).data == entry_bytes("emacs")  # the backup's grace changes nothing
    fs.index.check()


async def test_real_conflict_in_an_editor_save_is_still_one(
    fs: Filesystem, drive: Driver, store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    await drive.rename(NAME, f"{NAME}~")
    store.write(KEY, entry_bytes("gateway"))  # changed while the editor was saving
    await settled(fs)
    with caplog.at_level(logging.WARNING, logger="sessionfs"):
        await drive.write(NAME, entry_bytes("editor"), os.O_WRONLY | os.O_CREAT)
    assert f"conflict on {NAME}" in caplog.text


async def test_renamed_away_is_removed_after_the_grace_period(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock
) -> None:
    await drive.rename(NAME, f"{NAME}.bak")
    assert not await drive.exists(NAME)
    assert NAME not in await drive.listdir()
    assert store.read(KEY).data == ORIGINAL  # kept while an editor may be saving
    clock.now += 1
    await fs.graces.expire()
    assert store.exists(KEY)
    clock.now += 2
    await fs.graces.expire()
    assert not store.exists(KEY)  # renamed away means gone: the mount and the store agree
    assert await drive.read(f"{NAME}.bak") == ORIGINAL  # the scratch copy lives on
    await settled(fs)
    assert not await drive.exists(NAME)


async def test_renamed_away_but_changed_meanwhile_is_kept(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock
) -> None:
    await drive.rename(NAME, f"{NAME}~")
    store.write(KEY, entry_bytes("gateway"))
    await settled(fs)
    clock.now += 5
    await fs.graces.expire()
    assert store.read(KEY).data == entry_bytes("gateway")
    await shows(drive, NAME, entry_bytes("gateway"))


@pytest.mark.parametrize("bad", [b"{broken", b""])
async def test_refused_save_brings_the_session_back(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock, bad: bytes
) -> None:
    """perl -i.bak with a bad edit: rename away, create anew, content refused."""
    await drive.rename(NAME, f"{NAME}.bak")
    fh = await drive.open(NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    await fs.operations.write(fh, 0, bad or b" ")
    with pytest.raises(pyfuse3.FUSEError):
        await drive.close(fh)
    await shows(drive, NAME, ORIGINAL)
    clock.now += 10
    await fs.graces.expire()
    assert store.read(KEY).data == ORIGINAL
    await shows(drive, NAME, ORIGINAL)


async def test_delete_then_refused_create_brings_the_session_back(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock
) -> None:
    """install, tar -x, git checkout: unlink, then create; the new content is refused."""
    mtime = store.stat(KEY).st_mtime_ns
    await drive.unlink(NAME)
    assert not store.exists(KEY)  # rm removes at once
    with pytest.raises(pyfuse3.FUSEError):
        await drive.write(NAME, b"{nope", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert store.read(KEY).data == ORIGINAL
    assert store.stat(KEY).st_mtime_ns == mtime  # the same version, back: same mtime
    await shows(drive, NAME, ORIGINAL)
    clock.now += 10
    await fs.graces.expire()
    await shows(drive, NAME, ORIGINAL)


async def test_unlink_is_final_after_the_grace_period(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock
) -> None:
    await drive.unlink(NAME)
    clock.now += 10
    await fs.graces.expire()
    assert len(fs.graces) == 0
    with pytest.raises(pyfuse3.FUSEError):
        await drive.write(NAME, b"{nope", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert not store.exists(KEY)
    assert NAME not in await drive.listdir()


async def test_round_trip_of_an_entry_the_store_would_refuse_today(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    """An entry migrated without updatedAt: tar -cf, then tar -xf (unlink + create)."""
    legacy = b'{"sessionId": "legacy"}'
    store.write("cron:legacy", legacy, validate=False)
    await settled(fs)
    name = "cron:legacy.json"
    saved = await drive.read(name)
    await drive.write(name, saved)  # over the existing file
    await drive.unlink(name)
    await drive.write(name, saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert store.read("cron:legacy").data == legacy
    with pytest.raises(pyfuse3.FUSEError):  # but not a different invalid content
        await drive.write(name, b'{"sessionId": "changed"}')


async def test_mount_end_keeps_sessions_renamed_away(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    await drive.rename(NAME, f"{NAME}~")
    fs.graces.keep_all()
    assert store.read(KEY).data == ORIGINAL


async def test_scratch_file_opened_with_o_trunc_starts_empty(drive: Driver) -> None:
    await drive.write("notes.txt", b"a long first line", os.O_WRONLY | os.O_CREAT)
    await drive.write("notes.txt", b"b")
    assert await drive.read("notes.txt") == b"b"


# -- races and edges ------------------------------------------------------------


class KernelCalls:
    """Records what the kernel would be told (the filesystem is not mounted in these tests)."""

    def __init__(self, fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        self.inodes: list[int] = []
        fs.kernel.mounted = True
        monkeypatch.setattr(
            pyfuse3, "invalidate_inode", lambda ino, attr_only=False: self.inodes.append(ino)
        )
        monkeypatch.setattr(
            pyfuse3,
            "invalidate_entry_async",
            lambda parent, name, ignore_enoent=False: self.names.append(name.decode()),
        )


async def test_a_failing_grace_end_keeps_the_session_and_the_mount(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock
) -> None:
    await drive.rename(NAME, f"{NAME}~")
    backing = store.path / "cron%3A1.json"
    os.unlink(backing)
    os.symlink("/etc/passwd", backing)  # a hostile file where the entry was
    clock.now += 10
    await fs.graces.expire()  # must not raise: it would end the mount
    assert len(fs.graces) == 0
    assert os.path.islink(backing)


async def test_readdir_never_replies_a_name_that_moved_or_went(
    fs: Filesystem, drive: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = fs.operations
    await drive.listdir()
    replied: list[tuple[str, int]] = []

    def reply(token: object, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if token == "first" and replied:
            return False  # the kernel's buffer is full: one entry per getdents
        replied.append((name.decode(), attrs.st_ino))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(pyfuse3.ROOT_INODE, CTX)
    await ops.readdir(fh, 0, "first")  # type: ignore[arg-type]
    later = OTHER_NAME if replied[0][0] == NAME else NAME
    await drive.rename(later, "cron:9.json")  # between two getdents calls
    await ops.readdir(fh, 1, "rest")  # type: ignore[arg-type]
    await ops.releasedir(fh)
    assert later not in dict(replied)


async def test_refused_rename_into_place_keeps_the_session(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock
) -> None:
    """sed -i.bak with a bad edit: f -> f.bak, then the refused sedXXXX -> f."""
    await drive.write("sedAbc123", b"{broken", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    await drive.rename(NAME, f"{NAME}.bak")
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await drive.rename("sedAbc123", NAME)
    assert raised.value.errno == errno.EPERM  # (mv reads EINVAL as "into itself")
    await shows(drive, NAME, ORIGINAL)
    clock.now += 10
    await fs.graces.expire()
    assert store.read(KEY).data == ORIGINAL


async def test_renaming_the_backup_back_as_its_grace_ends_keeps_the_session(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates, clock: Clock
) -> None:
    await drive.rename(NAME, f"{NAME}~")
    clock.now += 10

    async def user_puts_it_back() -> None:
        await drive.rename(f"{NAME}~", NAME)  # writes the identical bytes: no new version

    await while_paused(gates, "before remove", fs.graces.expire, user_puts_it_back, queued=True)
    await settled(fs)
    assert store.read(KEY).data == ORIGINAL
    await shows(drive, NAME, ORIGINAL)


async def test_a_lookup_while_a_grace_ends_leaves_no_stale_name(
    fs: Filesystem,
    drive: Driver,
    store: SessionStore,
    gates: Gates,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await drive.listdir()
    await drive.rename(NAME, f"{NAME}~")
    clock.now += 10

    async def lookup() -> None:
        assert not await drive.exists(NAME)  # still hidden while it is being removed

    await while_paused(gates, "after remove", fs.graces.expire, lookup)
    assert not store.exists(KEY)
    assert not await drive.exists(NAME)


@pytest.mark.parametrize("target", ["cron:7.json", f"{NAME}~"])
async def test_data_written_then_renamed_then_closed_lands_under_the_new_name(
    fs: Filesystem, drive: Driver, store: SessionStore, target: str
) -> None:
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    new = entry_bytes("written-before-rename")
    await fs.operations.write(fh, 0, new)
    await drive.rename(NAME, target)
    await drive.close(fh)
    if target.endswith(".json"):
        assert store.read("cron:7").data == new
    else:
        assert await drive.read(target) == new  # the scratch file it became holds it


async def test_commit_racing_a_rename_to_a_backup_is_no_internal_error(
    fs: Filesystem, drive: Driver, gates: Gates, caplog: pytest.LogCaptureFixture
) -> None:
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    await fs.operations.write(fh, 0, entry_bytes("mine"))
    await while_paused(
        gates,
        "after write",
        lambda: fs.operations.flush(fh),
        lambda: drive.rename(NAME, f"{NAME}~"),  # vim, in another process
        queued=True,
    )
    await fs.operations.release(fh)
    assert "internal error" not in caplog.text


async def test_fstat_of_an_open_file_after_rm_or_replace_shows_its_bytes(
    fs: Filesystem, drive: Driver
) -> None:
    ops = fs.operations
    for name, change in ((NAME, "rm"), (OTHER_NAME, "mv")):
        ino = (await drive.lookup(name)).st_ino
        fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
        if change == "rm":
            await drive.unlink(name)
        else:
            await drive.write(
                "cron:3.json", entry_bytes("longer", pad="x" * 300), os.O_WRONLY | os.O_CREAT
            )
            await drive.rename("cron:3.json", name)
        attrs = await ops.getattr(ino, CTX)
        data = await ops.read(fh, 0, 1 << 20)
        await ops.release(fh)
        assert attrs.st_size == len(data), change
        assert attrs.st_mtime_ns > 0, change
        assert attrs.st_nlink == 0, change


async def test_outside_touch_is_a_change_and_estale_shows_what_is_there(
    store: SessionStore, gates: Gates, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = watched(make_filesystem(store.path.parent, gates, clock, conflict=CONFLICT_FAIL))
    drive = Driver(fs, monkeypatch)
    await drive.listdir()
    os.utime(store.path / "cron%3A1.json", ns=(1, 1))  # touched behind the mount, unseen
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await drive.write(NAME, entry_bytes("mine"))
    assert raised.value.errno == errno.ESTALE
    await drive.write(NAME, entry_bytes("mine"))  # the refusal refreshed what is known
    assert store.read(KEY).data == entry_bytes("mine")


async def test_identical_bytes_are_accepted_even_under_conflict_fail(
    store: SessionStore, gates: Gates, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = watched(make_filesystem(store.path.parent, gates, clock, conflict=CONFLICT_FAIL))
    drive = Driver(fs, monkeypatch)
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    outside = entry_bytes("outside")
    store.write(KEY, outside)
    await settled(fs)
    await fs.operations.write(fh, 0, outside)
    await drive.close(fh)
    assert store.read(KEY).data == outside


async def test_a_listing_never_undoes_an_operation_that_ended_during_it(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    """A create stamps itself, a listing starts, the create ends, the listing ends."""
    new = entry_bytes("new")
    create_gate = gates.arm("before write")  # the create has taken its stamp
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drive.write, "cron:new.json", new, os.O_WRONLY | os.O_CREAT)
        await trio.to_thread.run_sync(create_gate.reached.wait)
        listing_gate = gates.arm("in stat_many")
        nursery.start_soon(drive.listdir)  # its keys do not include the new file yet
        await trio.to_thread.run_sync(listing_gate.reached.wait)
        create_gate.go.set()
        while not store.exists("cron:new"):
            await trio.sleep(0.01)
        await trio.sleep(0.05)  # the create's continuation has run
        listing_gate.go.set()
    await shows(drive, "cron:new.json", new)


async def test_a_listing_that_learns_an_outside_removal_tells_the_kernel(
    fs: Filesystem, drive: Driver, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = KernelCalls(fs, monkeypatch)
    await drive.lookup(NAME)  # the kernel holds the name
    store.delete(KEY)  # the gateway; its event not processed yet
    await drive.listdir()
    assert NAME in kernel.names


async def test_a_failed_watcher_stat_forgets_rather_than_removes(
    fs: Filesystem, drive: Driver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await drive.listdir()
    backings = fs.operations.backings
    real = backings.run

    async def failing(agent_id: str | None, what: str, call: object, **how: bool) -> object:
        if what == "stat":
            raise OSError(errno.EIO, "transient")
        return await real(agent_id, what, call, **how)  # type: ignore[arg-type]

    monkeypatch.setattr(backings, "run", failing)
    await fs.index.refresh(fs.operations.tree.root, [KEY])
    monkeypatch.setattr(backings, "run", real)
    assert "could not look at 1 changed session(s)" in caplog.text
    await shows(drive, NAME, ORIGINAL)


async def test_renames_to_scratch_names_count_against_the_scratch_budget(
    store: SessionStore, gates: Gates, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:

    big = entry_bytes("big", pad="x" * 5000)
    for i in range(4):
        store.write(f"cron:big{i}", big)
    limits = Limits(max_entry_bytes=1 << 20, scratch_bytes=12000)
    fs = watched(make_filesystem(store.path.parent, gates, clock, limits=limits))
    drive = Driver(fs, monkeypatch)
    await drive.rename("cron:big0.json", "cron:big0.bak")
    await drive.rename("cron:big1.json", "cron:big1.bak")
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await drive.rename("cron:big2.json", "cron:big2.bak")
    assert raised.value.errno == errno.ENOSPC
    assert await drive.exists("cron:big2.json")


async def test_the_control_directory_name_is_never_a_rename_target(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock
) -> None:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await drive.rename(NAME, ".sessionfs")
    assert raised.value.errno == errno.EISDIR
    clock.now += 10
    await fs.graces.expire()
    assert store.read(KEY).data == ORIGINAL


async def test_an_uncommitted_new_file_can_be_renamed_and_truncated(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    await drive.write("new.json", b"", os.O_WRONLY | os.O_CREAT)  # touch
    await drive.rename("new.json", "newer.json")
    assert "newer.json" in await drive.listdir()
    ino = (await drive.lookup("newer.json")).st_ino
    await fs.operations.setattr(ino, size_of(0), fields(update_size=True), None, CTX)
    await drive.write("newer.json", entry_bytes("now"))
    assert store.read("newer").data == entry_bytes("now")


async def test_read_only_stores_refuse_new_files_and_renames_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "sessions.json").write_bytes(orjson.dumps({KEY: {"sessionId": "s"}}))
    drive = Driver(make_filesystem(tmp_path / "legacy"), monkeypatch)
    attempts: list[Callable[[], Awaitable[None]]] = [
        lambda: drive.write("cron:new.json", b"", os.O_WRONLY | os.O_CREAT),
        lambda: drive.rename(NAME, f"{NAME}.bak"),
        lambda: drive.unlink(NAME),
    ]
    for attempt in attempts:
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await attempt()
        assert raised.value.errno == errno.EROFS
    assert await drive.listdir() == [".sessionfs", NAME]


# -- found by a second review ------------------------------------------------------


# An abandoned replacement (undo without claim) while the grace end is removing
async def test_abandoned_replacement_during_grace_end_loses_the_session(
    store: SessionStore, gates: Gates, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = Limits(max_entry_bytes=4096)
    fs = watched(make_filesystem(store.path.parent, gates, clock, limits=limits))
    drive = Driver(fs, monkeypatch)
    await drive.rename(NAME, f"{NAME}~")  # vim/emacs backup, or mv f f.bak
    clock.now += 10

    async def replacement_refused() -> None:
        fh = await drive.open(NAME, os.O_WRONLY | os.O_CREAT)
        await fs.operations.write(fh, 0, b"{")
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await fs.operations.write(fh, 0, b"x" * 5000)  # over the cap: EFBIG
        assert raised.value.errno == errno.EFBIG
        with pytest.raises(pyfuse3.FUSEError):
            await drive.close(fh)  # release -> _abandon -> graces.undo (no claim)
        # the refusal "brought it back":
        assert await drive.exists(NAME)

    await while_paused(gates, "before remove", fs.graces.expire, replacement_refused, queued=True)
    # the refused replacement must leave the session in the store
    assert store.exists(KEY), "session removed although its replacement was refused"


async def test_abandoned_replacement_index_disagrees_with_store(
    store: SessionStore, gates: Gates, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = Limits(max_entry_bytes=4096)
    fs = watched(make_filesystem(store.path.parent, gates, clock, limits=limits))
    drive = Driver(fs, monkeypatch)
    await drive.rename(NAME, f"{NAME}~")
    clock.now += 10

    async def replacement_refused() -> None:
        fh = await drive.open(NAME, os.O_WRONLY | os.O_CREAT)
        await fs.operations.write(fh, 0, b"{")
        with pytest.raises(pyfuse3.FUSEError):
            await fs.operations.write(fh, 0, b"x" * 5000)
        with pytest.raises(pyfuse3.FUSEError):
            await drive.close(fh)

    await while_paused(gates, "before remove", fs.graces.expire, replacement_refused, queued=True)
    root = fs.operations.tree.root
    assert (root.present(KEY) is not None) == store.exists(KEY), "index and store disagree"


# A commit in flight when the file is removed resurrects it
async def test_commit_racing_rm_resurrects_the_session(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    await drive.listdir()
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    await fs.operations.write(fh, 0, entry_bytes("mine"))
    await while_paused(
        gates,
        "before write",
        lambda: fs.operations.flush(fh),
        lambda: drive.unlink(NAME),
        queued=True,
    )
    await fs.operations.release(fh)
    root = fs.operations.tree.root
    assert (root.present(KEY) is not None) == store.exists(KEY), "index and store disagree"
    assert not store.exists(KEY), "rm was undone by a close that overlapped it"


async def test_commit_racing_rm_drops_the_unlink_grace_record(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    await fs.operations.write(fh, 0, entry_bytes("mine"))
    await while_paused(
        gates,
        "after write",
        lambda: fs.operations.flush(fh),
        lambda: drive.unlink(NAME),
        queued=True,
    )
    await fs.operations.release(fh)
    assert len(fs.graces) == 1, "the rm's grace record was ended by a commit to an unlinked file"


# A commit in flight when the file is renamed lands under the OLD name
async def test_commit_racing_mv_lands_under_the_old_name(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    await drive.listdir()
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    await fs.operations.write(fh, 0, entry_bytes("mine"))
    await while_paused(
        gates,
        "before write",
        lambda: fs.operations.flush(fh),
        lambda: drive.rename(NAME, "cron:9.json"),
        queued=True,
    )
    await fs.operations.release(fh)
    # either serial order leaves exactly cron:9 = mine
    assert not store.exists(KEY), f"old name resurrected: {store.read(KEY).data!r}"
    assert store.read("cron:9").data == entry_bytes("mine")


# Listing bookkeeping: a scan that started before a rescan / failed stat sets complete again
@pytest.mark.parametrize("how", ["rescan", "failed-stat"])
async def test_listing_racing_lost_events_hides_a_new_session(
    fs: Filesystem,
    drive: Driver,
    store: SessionStore,
    gates: Gates,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    root = fs.operations.tree.root
    new = entry_bytes("new")

    async def gateway_creates_and_events_are_lost() -> None:
        store.write("cron:new", new)
        if how == "rescan":
            await fs.index.rescan(root)  # inotify overflow
        else:
            backings = fs.operations.backings
            real = backings.run

            async def failing(agent_id, what, call, **how):  # type: ignore[no-untyped-def]
                if what == "stat":
                    raise OSError(errno.EIO, "transient")
                return await real(agent_id, what, call, **how)

            monkeypatch.setattr(backings, "run", failing)
            await fs.index.refresh(root, ["cron:new"])
            monkeypatch.setattr(backings, "run", real)

    await while_paused(gates, "in stat_many", drive.listdir, gateway_creates_and_events_are_lost)
    assert store.exists("cron:new")
    assert await drive.exists("cron:new.json"), "a session in the store is hidden from the mount"


# A listing skips a busy key; if that operation fails, the key is never learnt
async def test_listing_skipping_a_failed_operation_hides_the_session(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    await drive.write("t.tmp", b"{broken", os.O_WRONLY | os.O_CREAT)

    async def rename_refused() -> None:
        with pytest.raises(pyfuse3.FUSEError):
            await drive.rename("t.tmp", NAME)

    async def list_meanwhile() -> None:
        await drive.listdir()

    gate = gates.arm("before write")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rename_refused)
        await trio.to_thread.run_sync(gate.reached.wait)
        await list_meanwhile()
        gate.go.set()
    assert store.read(KEY).data == ORIGINAL
    assert await drive.exists(NAME), "session in the store, hidden from the mount"


# The grace task spins while a handler's conclude is in flight past the deadline
async def test_grace_task_spins_while_a_handler_concludes(
    fs: Filesystem,
    drive: Driver,
    store: SessionStore,
    gates: Gates,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await drive.rename(NAME, f"{NAME}.bak")
    calls = 0
    real = fs.graces.expire

    async def counting(nursery: trio.Nursery | None = None) -> None:
        nonlocal calls
        calls += 1
        await real(nursery)

    monkeypatch.setattr(fs.graces, "expire", counting)

    async def meanwhile() -> None:
        clock.now += 10  # the removal (lock wait, slow fsync) outlasts the deadline
        with trio.move_on_after(0.3):
            await fs.graces.run()

    await while_paused(gates, "before remove", lambda: drive.unlink(f"{NAME}.bak"), meanwhile)
    assert calls < 10, f"expire() ran {calls} times in 0.3 s"


# Tree invariants while a backup's grace ends from unlink (away -> dropped node)
async def test_away_entry_outlives_its_backup_node_during_conclude(
    fs: Filesystem, drive: Driver, gates: Gates
) -> None:
    await drive.rename(NAME, f"{NAME}.bak")

    failures: list[str] = []

    async def check() -> None:
        try:
            fs.index.check()
        except AssertionError as exc:
            failures.append(f"check() failed mid-conclude: {exc!r}")

    await while_paused(gates, "before remove", lambda: drive.unlink(f"{NAME}.bak"), check)
    assert not failures, failures


# A failed write-back in undo loses the unlinked session for good
async def test_failed_undo_loses_the_grace_snapshot(
    fs: Filesystem,
    drive: Driver,
    store: SessionStore,
    monkeypatch: pytest.MonkeyPatch,
    clock: Clock,
) -> None:
    await drive.unlink(NAME)
    backings = fs.operations.backings
    real = backings.run
    writes = 0

    async def full_disk(agent_id, what, call, **how):  # type: ignore[no-untyped-def]
        nonlocal writes
        if what == "write":
            writes += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(agent_id, what, call, **how)

    monkeypatch.setattr(backings, "run", full_disk)
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await drive.write(NAME, entry_bytes("new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    monkeypatch.setattr(backings, "run", real)
    assert raised.value.errno == errno.ENOSPC
    assert writes >= 2  # the commit, then undo's write-back (tried again at release)
    assert len(fs.graces) == 1, "the only copy of the removed session was dropped"


# conflict=fail: create while a grace end's removal is in flight -> spurious ESTALE
async def test_create_during_grace_removal_is_refused_estale(
    store: SessionStore, gates: Gates, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = watched(make_filesystem(store.path.parent, gates, clock, conflict=CONFLICT_FAIL))
    drive = Driver(fs, monkeypatch)
    await drive.rename(NAME, f"{NAME}~")
    clock.now += 10

    errors: list[int] = []

    async def save() -> None:
        try:
            await drive.write(NAME, entry_bytes("new"), os.O_WRONLY | os.O_CREAT)
        except pyfuse3.FUSEError as exc:
            errors.append(exc.errno)

    await while_paused(gates, "after remove", fs.graces.expire, save, queued=True)
    assert errors == [], [errno.errorcode[e] for e in errors]
    assert store.read(KEY).data == entry_bytes("new")


# fstat of a reader whose file went behind the mount and was then created anew
async def test_fstat_after_outside_removal_and_create(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    ops = fs.operations
    ino = (await drive.lookup(NAME)).st_ino
    fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
    store.delete(KEY)
    await settled(fs)
    await drive.write(NAME, entry_bytes("new"), os.O_WRONLY | os.O_CREAT)
    attrs = await ops.getattr(ino, CTX)
    data = await ops.read(fh, 0, 1 << 20)
    await ops.release(fh)
    assert (attrs.st_size, attrs.st_mtime_ns > 0) == (len(data), True)


# Two listings: _scans[...].remove(touched) removes an *equal* set, not this scan's
async def test_second_listing_steals_the_first_listings_touched_set(
    fs: Filesystem,
    drive: Driver,
    store: SessionStore,
    gates: Gates,
    caplog: pytest.LogCaptureFixture,
) -> None:
    new = entry_bytes("new")
    errors: list[int] = []

    async def listing_a() -> None:
        try:
            await drive.listdir()
        except pyfuse3.FUSEError as exc:
            errors.append(exc.errno)

    create_gate = gates.arm("before write")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drive.write, "cron:new.json", new, os.O_WRONLY | os.O_CREAT)
        await trio.to_thread.run_sync(create_gate.reached.wait)  # commit stamped, in flight
        listing_gate = gates.arm("in stat_many")
        nursery.start_soon(listing_a)  # listing A: keys taken, paused
        await trio.to_thread.run_sync(listing_gate.reached.wait)
        await drive.listdir()  # listing B (another `ls`): runs and ends first
        create_gate.go.set()
        while not store.exists("cron:new"):
            await trio.sleep(0.01)
        await trio.sleep(0.05)
        listing_gate.go.set()
    leftover = fs.index._scans.get(fs.operations.tree.root.ino)
    assert errors == [], leftover
    assert "internal error" not in caplog.text
    assert not leftover, f"orphaned touched set(s) left in _scans: {leftover}"


# An old record's _drop removes a NEWER record's hold on the name (same backup node)
async def test_finishing_record_drops_the_next_records_hold_on_the_name(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates, clock: Clock
) -> None:
    await drive.rename(NAME, f"{NAME}~")
    clock.now += 10

    async def back_and_away_again() -> None:
        await drive.rename(f"{NAME}~", NAME)  # identical bytes: claims, ends the record
        await drive.rename(NAME, f"{NAME}~")  # a new record, same backup node

    await while_paused(gates, "before remove", fs.graces.expire, back_and_away_again, queued=True)
    assert len(fs.graces) == 1
    assert not await drive.exists(NAME), "renamed away, yet shown under its name"


async def test_identical_save_through_a_new_file_as_the_grace_ends_keeps_the_session(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates, clock: Clock
) -> None:
    await drive.rename(NAME, f"{NAME}~")
    clock.now += 10

    async def save_identical() -> None:
        await drive.write(NAME, ORIGINAL, os.O_WRONLY | os.O_CREAT)  # tar -xf, cp -p

    await while_paused(gates, "before remove", fs.graces.expire, save_identical, queued=True)
    assert store.read(KEY).data == ORIGINAL


# ATTRIB: a chmod behind the mount is learnt but never told to the kernel
async def test_outside_chmod_is_told_to_the_kernel(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    await drive.listdir()
    os.chmod(store.path / "cron%3A1.json", 0o400)
    await settled(fs)  # what the watcher does on the ATTRIB event
    assert (await drive.lookup(NAME)).st_mode & 0o777 == 0o400  # the daemon knows
    assert fs.kernel.invalidations == 1, "the kernel keeps showing 0600 for 300 s"


# identical bytes accepted under conflict=fail, yet logged as "this later commit wins"
async def test_identical_accept_is_not_logged_as_a_conflict(
    store: SessionStore,
    gates: Gates,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fs = watched(make_filesystem(store.path.parent, gates, clock, conflict=CONFLICT_FAIL))
    drive = Driver(fs, monkeypatch)
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    outside = entry_bytes("outside")
    store.write(KEY, outside)
    await settled(fs)
    await fs.operations.write(fh, 0, outside)
    with caplog.at_level(logging.WARNING, logger="sessionfs"):
        await drive.close(fh)
    assert "conflict" not in caplog.text, caplog.text


# -- memory: keys that went are forgotten ------------------------------------------


async def test_gone_keys_are_forgotten_once_the_kernel_lets_go(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    root = fs.operations.tree.root
    await drive.listdir()
    baseline_nodes, baseline_known = len(fs.operations.tree.nodes), len(root.known)
    churn = [f"cron:churn{i}" for i in range(50)]
    for key in churn:
        store.write(key, entry_bytes(key.replace(":", "-")))
    await fs.index.refresh(root, churn)  # the watcher's events for them
    inodes = {key: (await drive.lookup(f"{key}.json")).st_ino for key in churn}
    for key in churn:
        store.remove(key)
    await settled(fs)
    assert len(fs.operations.tree.nodes) == baseline_nodes + 50  # the kernel still holds them
    await fs.operations.forget([(ino, 1) for ino in inodes.values()])
    assert len(fs.operations.tree.nodes) == baseline_nodes
    assert len(root.known) == baseline_known
    assert fs.index.forgotten >= 50
    store.write(churn[0], entry_bytes("back"))  # a key that comes back is a new file
    await fs.index.refresh(root, churn[:1])
    assert (await drive.lookup(f"{churn[0]}.json")).st_ino not in inodes.values()
    assert await drive.read(f"{churn[0]}.json") == entry_bytes("back")


async def test_lookups_of_missing_names_keep_nothing(fs: Filesystem, drive: Driver) -> None:
    root = fs.operations.tree.root
    fs.index.unwatch(None)  # every lookup asks the disk
    before = (len(root.known), len(fs.operations.tree.nodes))
    for i in range(100):
        assert not await drive.exists(f"cron:missing{i}.json")
    assert (len(root.known), len(fs.operations.tree.nodes)) == before


async def test_a_look_that_began_before_a_key_went_cannot_bring_it_back(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    root = fs.operations.tree.root
    await fs.index.scan(root)  # complete, and no node the kernel holds keeps the key

    async def reads_old_version() -> None:
        await fs.index.read(root, KEY)  # an open that read the entry before it went

    async def gateway_removes() -> None:
        store.remove(KEY)
        await settled(fs)  # the watcher learns it went, while the read is in flight

    await while_paused(gates, "after read", reads_old_version, gateway_removes)
    assert root.present(KEY) is None
    assert NAME not in await drive.listdir()
    assert not await drive.exists(NAME)
    assert KEY not in root.known  # with nothing in flight, it is forgotten


# -- transcripts of removed sessions -----------------------------------------------


def transcripts(sessions_dir: Path, session_id: str) -> list[str]:
    return sorted(p.name for p in sessions_dir.iterdir() if p.name.startswith(session_id))


async def test_rm_archives_the_transcript_when_the_removal_is_final(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock, sessions_dir: Path
) -> None:
    (sessions_dir / "original.jsonl").write_text('{"type":"session"}\n')
    (sessions_dir / "original-topic-7.jsonl").write_text('{"type":"session"}\n')
    await drive.unlink(NAME)
    assert transcripts(sessions_dir, "original") == [
        "original-topic-7.jsonl",
        "original.jsonl",
    ]  # within the grace period a refused replacement could still bring it back
    clock.now += 10
    await fs.graces.expire()
    archived = transcripts(sessions_dir, "original")
    assert len(archived) == 2
    assert all(".jsonl.deleted." in name for name in archived)


async def test_rm_keeps_a_transcript_another_entry_references(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock, sessions_dir: Path
) -> None:
    (sessions_dir / "original.jsonl").write_text('{"type":"session"}\n')
    store.write("cron:3", entry_bytes("ORIGINAL"))  # the same session id, another case
    await drive.unlink(NAME)
    clock.now += 10
    await fs.graces.expire()
    assert transcripts(sessions_dir, "original") == ["original.jsonl"]


async def test_a_refused_replacement_keeps_the_transcript(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock, sessions_dir: Path
) -> None:
    (sessions_dir / "original.jsonl").write_text('{"type":"session"}\n')
    await drive.unlink(NAME)
    with pytest.raises(pyfuse3.FUSEError):
        await drive.write(NAME, b"{nope", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    clock.now += 10
    await fs.graces.expire()
    assert transcripts(sessions_dir, "original") == ["original.jsonl"]


async def test_an_editor_backup_removed_for_good_archives_the_transcript(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock, sessions_dir: Path
) -> None:
    (sessions_dir / "original.jsonl").write_text('{"type":"session"}\n')
    await drive.rename(NAME, "notes.txt")  # renamed away, never written anew
    clock.now += 10
    await fs.graces.expire()
    assert not store.exists(KEY)
    (archived,) = transcripts(sessions_dir, "original")
    assert archived.startswith("original.jsonl.deleted.")


async def test_rm_keeps_a_transcript_another_entry_names_in_its_session_file(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock, sessions_dir: Path
) -> None:
    (sessions_dir / "original.jsonl").write_text('{"type":"session"}\n')
    (sessions_dir / "mine.jsonl").write_text('{"type":"session"}\n')
    store.write("cron:3", entry_bytes("other", sessionFile="original.jsonl"))
    store.write("cron:4", entry_bytes("four", sessionFile="mine.jsonl"))
    await drive.unlink(NAME)
    await drive.unlink("cron:4.json")  # its own transcript is the one its sessionFile names
    clock.now += 10
    await fs.graces.expire()
    assert transcripts(sessions_dir, "original") == ["original.jsonl"]
    (archived,) = transcripts(sessions_dir, "mine")
    assert archived.startswith("mine.jsonl.deleted.")


# -- the watcher and the mount's own renames ---------------------------------------

OUR_TEMP = ".sfs-0123456789abcdef.tmp"


@dataclasses.dataclass
class InotifyEvent:
    wd: int
    mask: int
    cookie: int
    name: str


def watch_the_store(fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Events of watch 1 are the store's; returns the keys each refresh looks at."""
    fs.watcher.watches[1] = _Watch(WatchTarget(Path("/store"), "entries", None, (0, 0)), 1)
    refreshed: list[list[str]] = []
    real = fs.index.refresh

    async def refresh(parent: Dir, keys: list[str], *, event: bool = False) -> None:
        refreshed.append(keys)
        await real(parent, keys, event=event)

    monkeypatch.setattr(fs.index, "refresh", refresh)
    monkeypatch.setattr(store_module, "_temp_name", lambda: OUR_TEMP)
    return refreshed


def our_rename(cookie: int) -> list[InotifyEvent]:
    file_name = key_to_filename(KEY)
    return [
        InotifyEvent(1, flags.MOVED_FROM, cookie, OUR_TEMP),
        InotifyEvent(1, flags.MOVED_TO, cookie, file_name),
    ]


async def test_own_rename_needs_no_stat_but_an_outside_write_before_it_does(
    fs: Filesystem, drive: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    refreshed = watch_the_store(fs, monkeypatch)
    await drive.listdir()
    await drive.write(NAME, entry_bytes("mine"))
    # an outside writer's close of the new file, queued after our d_move but before
    # the rename's own events (vfs_rename notifies last)
    outside = InotifyEvent(1, flags.CLOSE_WRITE, 0, key_to_filename(KEY))
    await fs.watcher.handle([outside, *our_rename(7)])
    assert refreshed == [[KEY]]
    await drive.write(NAME, entry_bytes("mine-again"))
    await fs.watcher.handle(our_rename(8))
    assert refreshed == [[KEY]]  # nothing else: no stat for our own rename
    assert fs.watcher.own_renames == 2


async def test_a_rename_read_before_its_commit_returned_is_never_taken_for_ours(
    fs: Filesystem, drive: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit in a worker thread: the watcher reads its rename first (and stats).  The
    commit must not then register its temp name: a later rename of a file of that name
    (whoever made it) would pass unlooked at."""
    refreshed = watch_the_store(fs, monkeypatch)
    await drive.listdir()
    await fs.watcher.handle(our_rename(7))  # read before the commit's continuation ran
    assert refreshed == [[KEY]]
    await drive.write(NAME, entry_bytes("mine"))
    await fs.watcher.handle(our_rename(9))  # someone renames a file of that name later
    assert refreshed == [[KEY], [KEY]]


async def test_an_open_renamed_to_a_scratch_name_meanwhile_still_reads_in_place(
    fs: Filesystem, drive: Driver, store: SessionStore, gates: Gates
) -> None:
    """vim renames the session to a backup while a reader's open waits for the store:
    the reader's handle holds the session's snapshot, which the page cache would cut
    at an older version's size, so it is still read in place."""
    await drive.listdir()
    newer = entry_bytes("newer", pad="n" * 300)
    store.write(KEY, newer)  # not yet seen by the watcher: the open reads the store
    ino = (await drive.lookup(NAME)).st_ino
    opened: list[pyfuse3.FileInfo] = []

    async def reader_opens() -> None:
        opened.append(await fs.operations.open(ino, os.O_RDONLY, CTX))

    async def editor_renames_it_away() -> None:
        await drive.rename(NAME, f"{NAME}~")

    await while_paused(gates, "after read", reader_opens, editor_renames_it_away)
    (info,) = opened
    assert info.direct_io
    assert await fs.operations.read(info.fh, 0, 1 << 20) == newer
    await fs.operations.release(info.fh)


@pytest.mark.parametrize("first_look", ["read", "rename to a backup"])
async def test_an_outside_change_found_before_the_watcher_reaches_the_kernel(
    fs: Filesystem,
    drive: Driver,
    store: SessionStore,
    monkeypatch: pytest.MonkeyPatch,
    first_look: str,
) -> None:
    """An open (or an editor's rename) reads the gateway's new version before the
    watcher stats it: the watcher then finds nothing new, so the kernel must have been
    told by whoever found it, or stat keeps the old size while reads serve the new."""
    kernel = KernelCalls(fs, monkeypatch)
    await drive.listdir()
    ino = (await drive.lookup(NAME)).st_ino
    newer = entry_bytes("outside", pad="x" * 500)
    store.write(KEY, newer)
    if first_look == "read":
        assert await drive.read(NAME) == newer
    else:
        await drive.rename(NAME, f"{NAME}~")
    await settled(fs)
    assert ino in kernel.inodes


async def test_install_over_an_existing_key_of_another_spelling_keeps_it(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    """`install` (or `tar -x`) of a session the gateway would look up under another
    spelling: its unlink went through, so the create that follows is of a key that went
    within its grace period, and may come back; refusing it lost the session."""
    odd_key = "agent:main:Upper"  # the gateway looks it up lower-cased
    odd_name = f"{odd_key}.json"
    data = entry_bytes("upper")
    store.write(odd_key, data, validate=False)
    await drive.listdir()
    await drive.unlink(odd_name)
    await drive.write(odd_name, data, flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert store.read(odd_key).data == data
    await shows(drive, odd_name, data)


async def test_a_stuck_key_holds_up_no_other_grace_period(
    fs: Filesystem, drive: Driver, store: SessionStore, clock: Clock
) -> None:
    """Another process holds one renamed-away key's lock: the other's grace period
    still ends on time (they ended one after another, each waiting up to the lock
    timeout behind the one before)."""
    await drive.rename(NAME, f"{NAME}~")
    await drive.rename(OTHER_NAME, f"{OTHER_NAME}~")
    with store.locks.hold(KEY):
        clock.now += 10
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.graces.run)
            with trio.fail_after(5):
                while store.exists(OTHER):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert store.exists(KEY)  # its end waits for the lock


async def test_an_outside_version_that_looks_like_an_earlier_one_is_read_anew(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    """The gateway replaces the entry twice (temp + rename, no kept versions): ext4
    gives the second new file the first one's freed inode, and with coarse timestamps
    it gets its mtime too, so (inode, mtime, size) repeats.  The event of the change
    must still make the mount read the entry anew rather than serve cached bytes."""
    backing = store.path / key_to_filename(KEY)
    first = entry_bytes("first", pad="1" * 100)
    _gateway_writes(backing, first)
    await settled(fs)
    assert await drive.read(NAME) == first  # cached now
    was = os.stat(backing)
    third = first.replace(b"1" * 100, b"3" * 100)
    for _attempt in range(20):
        _gateway_writes(backing, entry_bytes("second", pad="2" * 100))
        _gateway_writes(backing, third)
        if os.stat(backing).st_ino == was.st_ino:
            break
        _gateway_writes(backing, first)
        await settled(fs)
        await drive.read(NAME)
        was = os.stat(backing)
    assert os.stat(backing).st_ino == was.st_ino, "ext4 reuses a freed inode number at once"
    os.utime(backing, ns=(was.st_atime_ns, was.st_mtime_ns))  # a coarse clock's tick
    await settled(fs)  # the watcher's look at the key's event
    assert await drive.read(NAME) == third


def _gateway_writes(backing: Path, data: bytes) -> None:
    """Replace *backing* as the gateway does: a temp file renamed over it."""
    temp = backing.with_name(f"{backing.name}.gw.tmp")
    temp.write_bytes(data)
    os.rename(temp, backing)


async def test_a_reader_during_an_editor_save_gets_the_committed_version(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    """vim's save: the session renamed to a backup (the store still holds it), a new
    file created and written, then closed.  A reader in between gets the version the
    store holds, in stat and in its bytes, not the new file's uncommitted (empty) state;
    after the close, the new version."""
    await drive.listdir()
    await drive.rename(NAME, f"{NAME}~")
    saved = entry_bytes("saved", pad="s" * 200)
    writer = await drive.open(NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    await shows(drive, NAME, ORIGINAL)
    await fs.operations.write(writer, 0, saved)
    await shows(drive, NAME, ORIGINAL)  # written, not committed
    await drive.close(writer)
    await shows(drive, NAME, saved)
    assert store.read(KEY).data == saved


async def test_a_file_created_after_rm_is_empty_until_written(
    fs: Filesystem, drive: Driver, store: SessionStore
) -> None:
    """`rm f.json; touch f.json`: the session is gone from the store, so the new file
    stands in for nothing."""
    await drive.listdir()
    await drive.unlink(NAME)
    writer = await drive.open(NAME, os.O_WRONLY | os.O_CREAT)
    assert (await drive.lookup(NAME)).st_size == 0
    assert await drive.read(NAME) == b""
    await drive.close(writer)


async def test_an_outside_change_during_an_editor_save_reaches_the_kernel(
    fs: Filesystem, drive: Driver, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new file of an editor's save shows the stored version: when the gateway
    changes it meanwhile, the kernel must ask for the new file's attributes again."""
    kernel = KernelCalls(fs, monkeypatch)
    await drive.listdir()
    await drive.rename(NAME, f"{NAME}~")
    writer = await drive.open(NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    ino = (await drive.lookup(NAME)).st_ino
    newer = entry_bytes("outside", pad="x" * 700)
    store.write(KEY, newer)
    await settled(fs)
    assert ino in kernel.inodes
    await shows(drive, NAME, newer)
    await fs.operations.release(writer)


async def test_a_refused_replacement_tells_the_kernel_after_the_session_is_back(
    fs: Filesystem,
    drive: Driver,
    store: SessionStore,
    gates: Gates,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """install of a broken file: the unlink went through, the content is refused and the
    session is written back.  A stat while it is written back sees the file as it was
    then; the kernel must be told to ask again after, not before."""
    kernel = KernelCalls(fs, monkeypatch)
    await drive.listdir()
    await drive.unlink(NAME)
    fh = await drive.open(NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    await fs.operations.write(fh, 0, b"not json")
    ino = (await drive.lookup(NAME)).st_ino
    told_before: list[int] = []

    async def refused_close() -> None:
        with pytest.raises(pyfuse3.FUSEError):
            await fs.operations.flush(fh)

    async def stat_meanwhile() -> None:
        await drive.lookup(NAME)
        told_before.append(len(kernel.inodes))

    await while_paused(gates, "after write", refused_close, stat_meanwhile)
    assert ino in kernel.inodes[told_before[0] :]
    await fs.operations.release(fh)
    await shows(drive, NAME, ORIGINAL)


@pytest.mark.parametrize("target", ["cron:Upper.json", "%zz.json"])
async def test_a_rename_to_a_refused_name_answers_eperm(
    fs: Filesystem, drive: Driver, target: str
) -> None:
    """A key the gateway would never look up, or a name that spells no key: mv reads
    EINVAL from rename(2) as "cannot move ... to a subdirectory of itself"."""
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await drive.rename(NAME, target)
    assert raised.value.errno == errno.EPERM
    await shows(drive, NAME, ORIGINAL)


async def test_a_stat_between_the_last_write_and_the_close_is_corrected(
    fs: Filesystem, drive: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After write() the kernel asks for the attributes again by itself, so a commit
    needs no invalidation; unless a stat came in between, whose answer (the committed
    version then) the kernel keeps."""
    kernel = KernelCalls(fs, monkeypatch)
    await drive.listdir()
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    newer = entry_bytes("newer", pad="n" * 300)
    await fs.operations.write(fh, 0, newer)
    ino = (await drive.lookup(NAME)).st_ino  # still the committed version's size
    await drive.close(fh)
    assert ino in kernel.inodes
    await shows(drive, NAME, newer)


async def test_an_update_without_a_stat_needs_no_invalidation(
    fs: Filesystem, drive: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = KernelCalls(fs, monkeypatch)
    await drive.listdir()
    await drive.lookup(NAME)
    await drive.write(NAME, entry_bytes("newer"))
    assert kernel.inodes == []


async def test_a_stat_after_a_clock_step_back_is_still_corrected(
    fs: Filesystem, drive: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock steps back (NTP) between the last write and a stat: the order of
    the two is still known, so the commit still tells the kernel."""
    kernel = KernelCalls(fs, monkeypatch)
    await drive.listdir()
    fh = await drive.open(NAME, os.O_WRONLY | os.O_TRUNC)
    await fs.operations.write(fh, 0, entry_bytes("newer", pad="n" * 300))
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() - 10**9)
    ino = (await drive.lookup(NAME)).st_ino
    await drive.close(fh)
    assert ino in kernel.inodes


@pytest.mark.parametrize("ends", ["by a signal", "by fusermount"])
async def test_an_unlinked_session_whose_end_waits_is_archived_at_unmount(
    fs: Filesystem, drive: Driver, clock: Clock, ends: str
) -> None:
    """The mount ends (a signal stops every wait for a key with EBUSY first; fusermount
    cancels) while an unlinked session's grace period waits for its key: the record
    stays for keep_all(), which archives its transcripts."""
    await drive.unlink(NAME)
    held = trio.Event()

    async def another_operation_on_the_key() -> None:
        async with fs.editing.backings.serialized(None, (KEY,), trio.current_time() + 60):
            held.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(another_operation_on_the_key)
        await held.wait()
        clock.now += 10
        nursery.start_soon(fs.graces.run)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        if ends == "by a signal":
            fs.stop()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        nursery.cancel_scope.cancel()
    assert [grace.key for grace in fs.graces.records.values()] == [KEY]
    assert not any(grace.finishing for grace in fs.graces.records.values())


async def test_a_removal_cut_short_by_the_unmount_is_not_called_kept(
    fs: Filesystem,
    drive: Driver,
    store: SessionStore,
    gates: Gates,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The end of a renamed-away session's grace period removed it, and the unmount
    cancelled the archive that follows: keep_all() archives, never says it kept it."""
    await drive.listdir()
    await drive.rename(NAME, f"{NAME}~")
    gate = gates.arm("after remove")
    async with trio.open_nursery() as nursery:
        clock.now += 10
        nursery.start_soon(fs.graces.run)
        await trio.to_thread.run_sync(gate.reached.wait)
        nursery.cancel_scope.cancel()
        gate.go.set()
    fs.stop()
    with caplog.at_level(logging.INFO, logger="sessionfs"):
        fs.graces.keep_all()
    assert not store.exists(KEY)
    assert "kept session" not in caplog.text
