"""`sessionfs mount` end to end: the tree, the read path and the daemon's life."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import orjson
import pytest

from sessionfs import cli
from sessionfs.keys import key_to_display
from sessionfs.mounts import find_mount
from sessionfs.store import SessionStore
from tests.helpers import entry, entry_bytes, raises_errno
from tests.mounting import REPO, Mount, cleanup, mounted, sessionfs, start_mount, wait_for
from tests.sqlite_state import build_sqlite_state

pytestmark = pytest.mark.fuse


@pytest.fixture
def mnt(state_dir: Path, tmp_path: Path) -> Iterator[Mount]:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        yield mount


def backing_keys(sessions_d: Path) -> dict[str, Path]:
    with SessionStore(sessions_d, create=False) as store:
        return {key: sessions_d / entry.name for key, entry in store.scan()}


def test_tree_lists_agents_and_sessions_by_key(mnt: Mount, state_dir: Path) -> None:
    assert sorted(os.listdir(mnt.path)) == [".sessionfs", "main", "work"]
    for agent in ("main", "work"):
        keys = backing_keys(state_dir / f"agents/{agent}/sessions/sessions.d")
        listed = os.listdir(mnt.path / agent)
        entries = sorted(name for name in listed if name.endswith(".json"))
        assert entries == sorted(key_to_display(k) for k in keys)
        transcripts = [name for name in listed if name.endswith(".jsonl")]
        assert transcripts  # beside the entries whose transcript exists
        assert set(transcripts) <= {key_to_display(k) + "l" for k in keys}
        assert len(entries) + len(transcripts) == len(listed)
    assert "agent:main:telegram:direct:james.json" in os.listdir(mnt.path / "main")


def test_every_fixture_key_reads_byte_equal(mnt: Mount, state_dir: Path) -> None:
    for agent in ("main", "work"):
        for key, backing in backing_keys(state_dir / f"agents/{agent}/sessions/sessions.d").items():
            shown = mnt.path / agent / key_to_display(key)
            assert shown.read_bytes() == backing.read_bytes(), key
    special = [
        "__proto__.json",
        "hook:100%25done.json",
        "agent:main:webchat:direct:zoë 東京.json",
        "agent:main:discord:channel:a%2Fb\\c.json",
        "agent:main:matrix:channel:!AbCdEfGh:matrix.org.json",
    ]
    for name in special:
        assert orjson.loads((mnt.path / "main" / name).read_bytes())["sessionId"]


def test_attributes(mnt: Mount, state_dir: Path) -> None:
    name = "agent:main:main.json"
    backing = state_dir / "agents/main/sessions/sessions.d/agent%3Amain%3Amain.json"
    st, bst = (mnt.path / "main" / name).stat(), backing.stat()
    assert st.st_size == len((mnt.path / "main" / name).read_bytes()) == bst.st_size
    assert st.st_mtime_ns == bst.st_mtime_ns
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_ISREG(st.st_mode)
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert st.st_ino != bst.st_ino
    dst = (mnt.path / "main").stat()
    assert stat.S_ISDIR(dst.st_mode)
    assert stat.S_IMODE(dst.st_mode) == 0o700
    sv, bsv = os.statvfs(mnt.path), os.statvfs(state_dir)
    assert (sv.f_blocks, sv.f_bsize, sv.f_namemax) == (bsv.f_blocks, bsv.f_bsize, 255)


def test_inode_numbers_are_stable_across_commits(mnt: Mount, state_dir: Path) -> None:
    path = mnt.path / "main" / "agent:main:main.json"
    inodes = {path.stat().st_ino for _ in range(3)}
    with SessionStore(state_dir / "agents/main/sessions/sessions.d") as store:
        before = store.stat("agent:main:main").st_ino
        store.write("agent:main:main", entry_bytes("new-id"))
        assert store.stat("agent:main:main").st_ino != before
    wait_for(lambda: b"new-id" in path.read_bytes(), what="the new content")
    inodes.add(path.stat().st_ino)
    assert len(inodes) == 1
    all_inodes = [p.stat().st_ino for p in (mnt.path / "main").iterdir()]
    assert len(set(all_inodes)) == len(all_inodes)


def test_non_entries_never_show(mnt: Mount, state_dir: Path) -> None:
    store = state_dir / "agents/work/sessions/sessions.d"
    before = sorted(os.listdir(mnt.path / "work"))
    (store / ".sfs-0123456789abcdef.tmp").write_text("{}")
    (store / ".hidden.json").write_text("{}")
    (store / "notes.txt").write_text("{}")
    (store / "agent:raw.json").write_text("{}")
    os.symlink("/etc/passwd", store / "link.json")
    os.mkfifo(store / "fifo.json")
    (store / "dir.json").mkdir()
    assert sorted(os.listdir(mnt.path / "work")) == before
    for name in ("link.json", "fifo.json", "dir.json"):
        with raises_errno(errno.ENOENT, errno.EPERM):
            (mnt.path / "work" / name).read_bytes()


def test_open_file_keeps_one_version(mnt: Mount, state_dir: Path) -> None:
    path = mnt.path / "main" / "agent:main:main.json"
    original = path.read_bytes()
    with open(path, "rb", buffering=0) as reader:
        first = reader.read(10)
        with SessionStore(state_dir / "agents/main/sessions/sessions.d") as store:
            store.write("agent:main:main", entry_bytes("replaced", pad="z" * 5000))
        rest = reader.read()
    assert first + rest == original
    wait_for(lambda: b"replaced" in path.read_bytes(), what="the new version on the next open")
    assert path.read_bytes() == entry_bytes("replaced", pad="z" * 5000)


def test_agents_appear_and_disappear(mnt: Mount, state_dir: Path) -> None:
    new = state_dir / "agents/ops/sessions"
    new.mkdir(parents=True)
    with SessionStore(new / "sessions.d") as store:
        store.write("agent:ops:main", entry_bytes("ops"))
    wait_for(lambda: "ops" in os.listdir(mnt.path), what="the new agent")
    assert os.listdir(mnt.path / "ops") == ["agent:ops:main.json"]
    shutil.rmtree(state_dir / "agents/ops")
    wait_for(lambda: "ops" not in os.listdir(mnt.path), what="the agent to leave the listing")
    wait_for(lambda: not (mnt.path / "ops").exists(), what="the agent to go")


def test_ten_thousand_entry_readdir(tmp_path: Path) -> None:
    sessions_d = tmp_path / "sessions" / "sessions.d"
    sessions_d.parent.mkdir()
    with SessionStore(sessions_d) as store:
        for i in range(10_000):
            store.create_unlocked(f"agent:big:webchat:direct:{i}", entry_bytes(f"s{i}"))
    with mounted(tmp_path / "sessions", tmp_path / "mnt") as mount:
        names = [n for n in os.listdir(mount.path) if not n.startswith(".")]
        assert len(names) == len(set(names)) == 10_000
        assert set(names) == {f"agent:big:webchat:direct:{i}.json" for i in range(10_000)}
        sizes = {
            e.name: e.stat().st_size for e in os.scandir(mount.path) if e.name.endswith(".json")
        }
        assert sizes["agent:big:webchat:direct:42.json"] == len(entry_bytes("s42"))


def test_listing_while_entries_come_and_go(tmp_path: Path) -> None:
    """Offsets survive inserts and deletes: entries present throughout are listed exactly once."""
    sessions_d = tmp_path / "sessions" / "sessions.d"
    sessions_d.parent.mkdir()
    with SessionStore(sessions_d) as store:
        for i in range(3000):
            store.create_unlocked(f"stable:{i}", entry_bytes())
    stop = threading.Event()

    def churn() -> None:
        with SessionStore(sessions_d) as store:
            i = 0
            while not stop.is_set():
                store.write(f"churn:{i}", entry_bytes(), durable=False)
                if i >= 5:
                    store.delete(f"churn:{i - 5}")
                i += 1

    with mounted(tmp_path / "sessions", tmp_path / "mnt") as mount:
        writer = threading.Thread(target=churn)
        writer.start()
        try:
            for _ in range(5):
                names = os.listdir(mount.path)
                assert len(names) == len(set(names))
                assert {n for n in names if n.startswith("stable:")} == {
                    f"stable:{i}.json" for i in range(3000)
                }
        finally:
            stop.set()
            writer.join()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_unmount_cleanly(state_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    with mounted(state_dir, tmp_path / "mnt", clean_exit=False) as mount:
        assert mount.stop(sig) == 0
        assert find_mount(mount.path) is None
        assert f"{sig.name} received; unmounting" in mount.log_text()
        assert "unmounted" in mount.log_text()
        assert os.listdir(mount.path) == []


def test_sigkill_then_remount(state_dir: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    with mounted(state_dir, mountpoint, clean_exit=False) as mount:
        mount.proc.send_signal(signal.SIGKILL)
        mount.proc.wait()
        # auto_unmount: the helper removes the mount once the daemon's connection closes
        wait_for(lambda: find_mount(mountpoint) is None, what="auto_unmount")
    with mounted(state_dir, mountpoint) as again:
        assert "main" in os.listdir(again.path)


def test_dead_mountpoint_is_recovered(state_dir: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    dead = start_mount(state_dir, mountpoint, "-o", "no_auto_unmount")
    try:
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        with raises_errno(errno.ENOTCONN):
            os.stat(mountpoint)  # "Transport endpoint is not connected"
        result = sessionfs("mount", str(state_dir), str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert f"cleaned up a dead sessionfs mount at {mountpoint}" in result.stdout
        assert "main" in os.listdir(mountpoint)
        assert sessionfs("umount", str(mountpoint)).returncode == 0
        assert find_mount(mountpoint) is None
    finally:
        cleanup(dead)


def test_daemon_mode_returns_when_ready_and_umount_waits(state_dir: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "daemon.log"
    # captured output: the daemon must not keep the pipes open, or this would hang
    result = sessionfs("mount", str(state_dir), str(mountpoint), "--log", str(log), timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"mounted {state_dir} at {mountpoint}" in result.stdout
    assert "main: migrated 41 entries" in result.stdout
    pid = int((mountpoint / ".sessionfs" / "pid").read_text())
    assert pid != os.getpid()
    assert (mountpoint / "main" / "agent:main:main.json").read_bytes()
    result = sessionfs("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"unmounted {mountpoint}"
    assert (
        not Path(f"/proc/{pid}").exists()
        or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    )
    assert find_mount(mountpoint) is None
    text = log.read_text()
    assert "mounted" in text
    assert "unmounted" in text
    assert " ERROR " not in text


def test_mount_errors_are_clear(state_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = sessionfs("mount", str(state_dir), str(missing))
    assert result.returncode == 1
    assert (
        f"mountpoint {missing} does not exist; create it with: mkdir -p {missing}" in result.stderr
    )
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = sessionfs("mount", str(state_dir), str(afile))
    assert result.returncode == 1
    assert "is not a directory" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = sessionfs("mount", str(empty), str(tmp_path))
    assert result.returncode == 2
    assert "holds no session store" in result.stderr
    with mounted(state_dir, tmp_path / "mnt") as mount:
        result = sessionfs("mount", str(state_dir), str(mount.path))
        assert result.returncode == 1
        assert "already a sessionfs mount" in result.stderr
    result = sessionfs("umount", str(tmp_path / "mnt"))
    assert result.returncode == 1
    assert "is not mounted" in result.stderr


@pytest.mark.parametrize(
    "args", [["mount"], ["mount", "a", "b", "c"], ["mount", "s", "m", "-o", "bogus"], ["nope"], []]
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = sessionfs(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.mark.parametrize("command", ["mount", "umount", "migrate", "demo", "ls"])
def test_every_command_has_help(command: str) -> None:
    result = sessionfs(command, "--help")
    assert result.returncode == 0
    assert f"usage: sessionfs {command}" in result.stdout


def test_no_migrate_shows_legacy_read_only(state_dir: Path, tmp_path: Path) -> None:
    legacy_path = state_dir / "agents/main/sessions/sessions.json"
    legacy = orjson.loads(legacy_path.read_bytes())
    before = legacy_path.read_bytes()
    with mounted(state_dir, tmp_path / "mnt", "--no-migrate") as mount:
        names = [n for n in os.listdir(mount.path / "main") if n.endswith(".json")]
        assert len(names) == len(legacy)  # no folding without migration
        shown = mount.path / "main" / "agent:main:main.json"
        assert orjson.loads(shown.read_bytes()) == legacy["agent:main:main"]
        assert stat.S_IMODE(shown.stat().st_mode) == 0o400
        with raises_errno(errno.EROFS, errno.EACCES):
            shown.write_bytes(entry_bytes())
    assert legacy_path.read_bytes() == before
    assert not (state_dir / "agents/main/sessions/sessions.d").exists()


def test_a_json_era_view_is_as_fresh_as_the_directory_store(
    state_dir: Path, tmp_path: Path
) -> None:
    """A gateway's write of sessions.json shows at once (the issue asks for 100 ms)."""
    legacy_path = state_dir / "agents/main/sessions/sessions.json"
    legacy = orjson.loads(legacy_path.read_bytes())
    with mounted(state_dir, tmp_path / "mnt", "--no-migrate") as mount:
        shown = mount.path / "main" / "agent:main:main.json"
        assert orjson.loads(shown.read_bytes()) == legacy["agent:main:main"]
        changed = {**legacy["agent:main:main"], "label": "written by the gateway"}
        temp = legacy_path.with_name("sessions.json.tmp")  # as OpenClaw writes it
        temp.write_bytes(
            orjson.dumps(
                {**legacy, "agent:main:main": changed, "cron:new": entry("s-new")},
                option=orjson.OPT_INDENT_2,
            )
        )
        temp.rename(legacy_path)
        written = time.monotonic()
        data = shown.read_bytes()  # the very next stat, open and read
        assert shown.stat().st_size == len(data)
        assert orjson.loads(data) == changed
        assert "cron:new.json" in os.listdir(mount.path / "main")
        assert time.monotonic() - written < 0.1


def test_demo_command(tmp_path: Path) -> None:
    """The quick start: every command the demo prints works pasted as it is, elsewhere."""
    mountpoint, state = tmp_path / "demo", tmp_path / "demo-state"
    result = subprocess.run(  # as the README types it, from the checkout
        [".venv/bin/sessionfs", "demo", str(mountpoint), "--state", str(state)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr
        tour = result.stdout.split("Every session is a file named by its key. Try:\n")[1]
        tried, done = tour.split("When done:\n")
        assert done.strip() in (  # (`sessionfs` alone once `scripts/setup --system` linked it)
            f"{REPO}/.venv/bin/sessionfs umount {mountpoint}",
            f"sessionfs umount {mountpoint}",
        )
        with mock.patch("sessionfs.cli.shutil.which", return_value=None):  # no jq, say
            typed = done.split(" umount ")[0]
            without_jq = cli._demo_tour(mountpoint, state, typed).split("Try:\n")[1]
        assert "jq" not in without_jq
        assert sorted(n for n in os.listdir(mountpoint) if not n.startswith(".")) == [
            "main",
            "work",
        ]
        total = sum(len(list((mountpoint / a).glob("*.json"))) for a in ("main", "work"))
        assert 45 <= total <= 55
        for path in (mountpoint / "main").glob("*.json"):
            assert orjson.loads(path.read_bytes())["sessionId"]
        for path in (mountpoint / "main").glob("*.jsonl"):  # the demo's transcripts
            assert orjson.loads(path.read_bytes().splitlines()[0])["type"] == "session"
        for line in {*tried.strip().splitlines(), *without_jq.split("When done:")[0].splitlines()}:
            if not line.strip():
                continue
            pasted = subprocess.run(
                ["bash", "-o", "pipefail", "-c", line.strip()],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert pasted.stdout.strip(), f"{line!r} printed nothing: {pasted.stderr}"
            # (`| head` may end a writer early: SIGPIPE's 141 is how such a pipe succeeds)
            assert pasted.returncode in (0, 141), f"{line!r}: {pasted.stderr}"
        again = sessionfs("demo", str(mountpoint), "--state", str(state))
        assert again.returncode == 0
        assert "already mounted" in again.stdout
    finally:
        sessionfs("umount", str(mountpoint))
    assert find_mount(mountpoint) is None


def test_the_demo_state_looks_used_today(tmp_path: Path) -> None:
    """Activity over the last two weeks: default maintenance plans nothing, `ls -lt` is recency."""
    state = state_for_demo(tmp_path / "state")
    now_ms = time.time() * 1000
    for agent in ("main", "work"):
        store = orjson.loads((state / "agents" / agent / "sessions" / "sessions.json").read_bytes())
        ages_days = sorted((now_ms - e["updatedAt"]) / 86_400_000 for e in store.values())
        assert 0 < ages_days[0] < 1
        assert ages_days[-1] < 15
    assert sessionfs("migrate", str(state)).returncode == 0
    planned = sessionfs("maintain", "--dry-run", str(state))
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert planned.stdout.splitlines() == ["main: nothing to remove", "work: nothing to remove"]


def test_control_files(mnt: Mount) -> None:
    assert int((mnt.path / ".sessionfs" / "pid").read_text()) == mnt.pid
    stats = mnt.stats()
    assert stats["since_mount"]["requests"]["lookup"] >= 1
    assert set(stats["now"]) == {"inodes", "open_files", "scratch_bytes", "grace_periods"}
    assert stats["last_check"] is None  # the first background check runs 30 s after mount
    with raises_errno(errno.EACCES, errno.EPERM):
        (mnt.path / ".sessionfs" / "pid").write_text("1")


def test_release_of_held_resources_on_umount(state_dir: Path, tmp_path: Path) -> None:
    """umount while a file is open elsewhere is refused clearly, --lazy detaches it."""
    with mounted(state_dir, tmp_path / "mnt", clean_exit=False) as mount:
        holder = subprocess.Popen(["sleep", "30"], cwd=mount.path / "main")
        try:
            result = sessionfs("umount", str(mount.path))
            assert result.returncode == 1
            assert "is busy" in result.stderr
            assert "--lazy" in result.stderr
            result = sessionfs("umount", "--lazy", str(mount.path))
            assert result.returncode == 0, result.stderr
            assert mount.proc.wait(timeout=30) == 0
        finally:
            holder.kill()
            holder.wait()
    time.sleep(0)


def test_debug_logs_a_line_per_request(state_dir: Path, tmp_path: Path) -> None:
    with mounted(state_dir, tmp_path / "mnt", "--debug") as mount:
        (mount.path / "main" / "agent:main:main.json").read_bytes()
        text = mount.log_text()
    assert "DEBUG   request lookup(1, main)" in text
    assert "request open(" in text
    assert "request read(" in text


def test_demo_recovers_its_dead_mount(tmp_path: Path) -> None:
    mountpoint, state = tmp_path / "demo", tmp_path / "demo-state"
    dead = start_mount(state_for_demo(state), mountpoint, "-o", "no_auto_unmount")
    try:
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        result = sessionfs("demo", str(mountpoint), "--state", str(state))
        assert result.returncode == 0, result.stderr
        assert "cleaned up a dead sessionfs mount" in result.stdout
        assert "main" in os.listdir(mountpoint)
    finally:
        sessionfs("umount", str(mountpoint))
        cleanup(dead)


def state_for_demo(state: Path) -> Path:
    from sessionfs.demo import build_demo_state

    return build_demo_state(state)


def test_a_hung_daemon_cannot_hang_status_or_umount(state_dir: Path, tmp_path: Path) -> None:
    mount = start_mount(state_dir, tmp_path / "mnt")
    try:
        os.kill(mount.pid, signal.SIGSTOP)  # alive, but answers nothing
        result = sessionfs("status", str(mount.path), timeout=30)
        assert result.returncode == 1
        assert "the daemon does not answer" in result.stderr
        result = sessionfs("umount", "--lazy", str(mount.path), timeout=30)
        assert result.returncode == 0, result.stderr
        assert "did not answer" in result.stdout
        assert find_mount(mount.path) is None
    finally:
        os.kill(mount.pid, signal.SIGCONT)
        cleanup(mount)


def test_only_a_mount_that_may_serve_a_store_stops_a_change_to_it(
    state_dir: Path, tmp_path: Path
) -> None:
    """The mount table names each mount's source (readable by every user, and with no
    daemon to ask): a hung mount of another store stops nothing, a hung mount of this
    one does, and a dead mount serves nothing."""
    other = tmp_path / "other"
    shutil.copytree(state_dir, other)
    mount = start_mount(other, tmp_path / "mnt", "-o", "no_auto_unmount")
    try:
        entry = find_mount(mount.path)
        assert entry is not None
        assert entry.source == str(other)
        os.kill(mount.pid, signal.SIGSTOP)  # alive, but answers nothing
        refused = sessionfs("migrate", str(other), timeout=30)
        assert refused.returncode == 1
        assert f"{other} is mounted at {mount.path}" in refused.stderr
        assert f"sessionfs umount --lazy {mount.path}" in refused.stderr  # (it is hung)
        unrelated = sessionfs("migrate", str(state_dir), timeout=30)
        assert unrelated.returncode == 0, unrelated.stderr
        os.kill(mount.pid, signal.SIGKILL)  # dead: the mount stays, nothing serves it
        os.kill(mount.pid, signal.SIGCONT)
        mount.proc.wait()
        assert find_mount(mount.path) is not None
        migrated = sessionfs("migrate", str(other), timeout=30)
        assert migrated.returncode == 0, migrated.stderr
    finally:
        cleanup(mount)


def test_a_source_whose_path_is_not_utf8_is_served_and_named(
    state_dir: Path, tmp_path: Path
) -> None:
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/state \xff,% "))  # (a trailing space)
    shutil.copytree(state_dir, odd)
    with mounted(odd, tmp_path / "mnt") as mount:
        assert (mount.path / ".sessionfs" / "source").read_bytes() == os.fsencode(odd) + b"\n"
        entry = find_mount(mount.path)
        assert entry is not None
        assert entry.source.endswith("/state%20%FF%2C%25%20")  # as the mount table has it
        status = sessionfs("status", str(mount.path))
        assert status.returncode == 0, status.stderr
        assert "main   directory era" in status.stdout
        for command, code in (("migrate", 1), ("maintain --mode enforce", 3), ("fsck --repair", 3)):
            refused = sessionfs(*command.split(), str(odd))
            assert refused.returncode == code, command
            assert "is mounted at" in refused.stderr


def test_status_without_a_mountpoint_lists_every_mount(state_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "listed"
    mnt.mkdir()
    started = sessionfs("mount", "--no-migrate", "--log", str(log), str(state_dir), str(mnt))
    assert started.returncode == 0, started.stderr
    try:
        result = sessionfs("status")
        assert result.returncode == 0, result.stderr
        (line,) = [line for line in result.stdout.splitlines() if line.startswith(f"{mnt}:")]
        assert f"source {state_dir}" in line
        assert f"log {log}" in line
        assert "pid " in line
    finally:
        sessionfs("umount", str(mnt))
    assert f"{mnt}:" not in sessionfs("status").stdout


def _status_table(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """The agents table of `sessionfs status MOUNTPOINT`, by agent."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("AGENT "))
    assert lines[start].split("  ")[0] == "AGENT"
    rows = {}
    for line in lines[start + 1 :]:
        cells = [cell.strip() for cell in line.split("  ") if cell.strip()]
        if len(cells) != 6:
            break
        rows[cells[0]] = cells[1:]
    return rows


def test_status_tabulates_each_agents_era_access_sessions_rejections_and_check(
    state_dir: Path, tmp_path: Path
) -> None:
    (state_dir / "agents/work/sessions/sessions.json").unlink()  # work: a SQLite-era agent
    build_sqlite_state(state_dir, {"work": {"agent:work:a": {"sessionId": "s-a", "updatedAt": 1}}})
    with mounted(state_dir, tmp_path / "mnt", "-o", "check_every=1") as mount:
        sessions = len([n for n in os.listdir(mount.path / "main") if n.endswith(".json")])
        with raises_errno(errno.EINVAL):  # refused at close, the old entry stays
            (mount.path / "main" / "agent:main:main.json").write_bytes(b"{")
        table = _status_table(sessionfs("status", str(mount.path)))
        assert table == {
            "main": ["directory era", "read-write", str(sessions), "1", "not yet"],
            "work": ["SQLite era", "read-only", "1", "0", "not yet"],
        }
        wait_for(lambda: mount.stats()["last_check"] is not None, what="the background check")
        assert mount.stats()["since_mount"]["rejected_writes"] == {
            "total": 1,
            "by_agent": {"main": 1},
        }
        table = _status_table(sessionfs("status", str(mount.path)))
        assert table["main"][4] == "1 problem(s)"  # the fixture's entry without updatedAt
        assert table["work"][4] == "not checked (OpenClaw's)"
    with mounted(state_dir, tmp_path / "mnt", "-o", "ro") as mount:
        result = sessionfs("status", str(mount.path / "main"))  # a directory in it will do
        assert f"{mount.path}: read-only sessionfs mount of {state_dir}" in result.stdout
        assert _status_table(result)["main"][:2] == ["directory era", "read-only"]
        # whoever was handed the read-only mount was not handed the store
        (tmp_path / "link").symlink_to(mount.path)
        for command, source in ((["restore"], mount.path), (["history", "--purge"], "link")):
            refused = sessionfs(*command, str(tmp_path / source), "agent:main:main")
            assert refused.returncode == 1
            assert "is in a read-only mount" in refused.stderr


def test_a_read_only_mount_refuses_every_write_and_migrates_nothing(
    state_dir: Path, tmp_path: Path
) -> None:
    legacy_path = state_dir / "agents/main/sessions/sessions.json"
    before = legacy_path.read_bytes()
    with mounted(state_dir, tmp_path / "mnt", "-o", "ro") as mount:
        assert (mount.path / "main" / "agent:main:main.json").read_bytes()
    assert legacy_path.read_bytes() == before  # -o ro implies no migration
    assert not (state_dir / "agents/main/sessions/sessions.d").exists()
    assert sessionfs("migrate", str(state_dir)).returncode == 0
    entries = state_dir / "agents/main/sessions/sessions.d"
    kept = sorted(p.name for p in entries.iterdir())
    with mounted(state_dir, tmp_path / "mnt", "-o", "ro") as mount:
        shown = mount.path / "main" / "agent:main:main.json"  # a read-write store, mounted ro
        data = shown.read_bytes()
        with raises_errno(errno.EROFS):
            shown.write_bytes(entry_bytes())
        with raises_errno(errno.EROFS):
            shown.unlink()
        with raises_errno(errno.EROFS):
            (mount.path / "main" / "cron:new.json").write_bytes(entry_bytes())
        assert shown.read_bytes() == data
    assert sorted(p.name for p in entries.iterdir()) == kept
    refused = sessionfs(
        "mount", "-o", "ro", "--maintain-every", "1h", str(state_dir), str(tmp_path / "mnt")
    )
    assert refused.returncode == 2
    assert "never maintained" in refused.stderr


def test_a_mountpoint_is_a_source_for_reading_and_refused_for_changing(
    state_dir: Path, tmp_path: Path
) -> None:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        listed = sessionfs("ls", str(mount.path), "--json", "--agent", "main")
        assert listed.returncode == 0, listed.stderr
        assert '"key":"agent:main:main"' in listed.stdout
        exported = sessionfs("export", str(mount.path / "work"))  # a directory in the mount
        assert exported.returncode == 0, exported.stderr
        assert "agent:work:main" in exported.stdout
        shown = sessionfs("show", str(mount.path), "agent:main:main", "--format", "jsonl")
        assert shown.returncode == 0, shown.stderr
        for command, code in ((["migrate"], 1), (["maintain", "--mode", "enforce"], 3)):
            refused = sessionfs(*command, str(mount.path))
            assert refused.returncode == code  # (maintain's 1 says something was removed)
            assert f"is mounted at {mount.path}" in refused.stderr
        (tmp_path / "link").symlink_to(mount.path)  # a link to the mount is the mount
        linked = sessionfs("ls", str(tmp_path / "link"), "--agent", "main")
        assert linked.returncode == 0, linked.stderr
        assert "agent:main:main" in linked.stdout
        for not_a_store in (".sessionfs", "no-such-agent"):
            missing = sessionfs("ls", str(mount.path / not_a_store))
            assert missing.returncode == 2
            assert "is inside the sessionfs mount" in missing.stderr
        again = sessionfs("mount", str(mount.path), str(tmp_path / "other"))
        assert again.returncode == 1
        assert "mount its source instead" in again.stderr


def test_systemd_is_told_when_the_mount_serves_and_when_it_stops(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Type=notify``: READY=1 arrives once the files are there; SIGTERM (``systemctl
    stop``) sends STOPPING=1 and unmounts cleanly."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        mount = start_mount(state_dir, tmp_path / "mnt")
        try:
            ready = listener.recv(4096).decode()
            assert "READY=1" in ready.splitlines()
            assert f"MAINPID={mount.pid}" in ready.splitlines()
            assert (mount.path / "main" / "agent:main:main.json").exists()
            assert mount.stop(signal.SIGTERM) == 0
            assert "STOPPING=1" in listener.recv(4096).decode().splitlines()
        finally:
            cleanup(mount)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / "docs" / "sessionfs.service").read_text()
    assert "Type=notify" in unit
    # as installed: the paths of this machine in place of the user's
    command = shutil.which("sessionfs") or str(REPO / ".venv" / "bin" / "sessionfs")
    local = unit.replace("/usr/local/bin/sessionfs", command).replace("%h", str(tmp_path))
    (tmp_path / "sessionfs.service").write_text(local)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "sessionfs.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mount_t_fuse_sessionfs_as_from_fstab(state_dir: Path, tmp_path: Path) -> None:
    """``mount -t fuse.sessionfs SOURCE MOUNTPOINT -o ...`` (an /etc/fstab line): mount.fuse3
    runs ``sessionfs SOURCE MOUNTPOINT -o OPTIONS`` with its own PATH and HOME=/root,
    passing on mount's own options (dev, suid); x-systemd.*, noauto, _netdev and nofail
    are for mount and systemd."""
    helper = Path("/usr/local/bin/sessionfs")  # on mount.fuse3's PATH
    if helper.exists():
        pytest.skip(f"{helper} is an installed sessionfs; not replaced by a test")
    helper.write_text(f'#!/bin/sh\nexec {REPO / ".venv" / "bin" / "sessionfs"} "$@"\n')
    helper.chmod(0o755)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        options = "rw,noauto,_netdev,nofail,x-systemd.automount,conflict=fail,lock_timeout=5"
        result = subprocess.run(
            ["mount", "-t", "fuse.sessionfs", str(state_dir), str(mountpoint), "-o", options],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert find_mount(mountpoint) is not None
        assert (mountpoint / "main" / "agent:main:main.json").read_bytes()
        assert sessionfs("umount", str(mountpoint)).returncode == 0
    finally:
        helper.unlink()
        if find_mount(mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def test_options_for_mount_itself_are_accepted_and_unknown_ones_refused(
    state_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "mnt").mkdir()
    result = sessionfs(str(state_dir), str(tmp_path / "mnt"), "-o", "rw,bogus_option")
    assert result.returncode == 2
    assert "unknown mount option 'bogus_option'" in result.stderr


def test_uid_and_gid_options_set_who_owns_what_the_mount_shows(
    state_dir: Path, tmp_path: Path
) -> None:
    with mounted(state_dir, tmp_path / "mnt", "-o", "uid=4242,gid=4243") as mount:
        for path in (mount.path / "main", mount.path / "main" / "agent:main:main.json"):
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (4242, 4243)
    result = sessionfs("mount", str(state_dir), str(tmp_path / "mnt"), "-o", "uid=me")
    assert result.returncode == 2
    assert "expected uid=N" in result.stderr


def test_extended_attributes_answer_enotsup(mnt: Mount) -> None:
    """getfattr/setfattr (and cp -a, rsync -X) get a clean "not supported", never EIO."""
    for path in (mnt.path / "main", mnt.path / "main" / "agent:main:main.json"):
        for call in (
            lambda p=path: os.getxattr(p, "user.x"),
            lambda p=path: os.listxattr(p),
            lambda p=path: os.setxattr(p, "user.x", b"1"),
            lambda p=path: os.removexattr(p, "user.x"),
        ):
            with raises_errno(errno.ENOTSUP, errno.ENODATA):
                call()
