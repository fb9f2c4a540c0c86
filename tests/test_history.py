"""Kept versions: every change through the store keeps what it replaced, and can be undone."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from sessionfs import maintain, sources
from sessionfs.catalog import Catalog
from sessionfs.cli import main as cli
from sessionfs.history import HISTORY_DIR, KEEP_NEWEST, PRUNE_SLACK, Actor, Retention, stamp_of
from sessionfs.keys import key_to_filename
from sessionfs.store import SessionStore
from tests.helpers import entry_bytes, raises_errno, vim_save
from tests.mounting import mounted, wait_for
from tests.mounting import sessionfs as mounting_sessionfs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    (tmp_path / "sessions").mkdir()
    return SessionStore(tmp_path / "sessions" / "sessions.d")


def kept(store: SessionStore, key: str) -> list[bytes]:
    assert store.history is not None
    name = key_to_filename(key)
    return [store.history.read(name, k, 1 << 20) for k in store.history.versions(name)]


def test_each_write_keeps_the_version_it_replaces(store: SessionStore) -> None:
    versions = [entry_bytes(f"v{i}", 100 + i) for i in range(4)]
    for data in versions:
        store.write("cron:a", data)
    assert kept(store, "cron:a") == versions[:3]  # oldest first; the fourth is current
    assert store.read("cron:a").data == versions[3]
    store.write("cron:a", versions[3])  # the same bytes: no new version, nothing kept
    assert len(kept(store, "cron:a")) == 3
    assert sorted(store.keys()) == ["cron:a"]  # the loader's rules: dot names are not entries


def test_a_removed_session_is_kept_and_restored(
    store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write("cron:a", entry_bytes("v1", 1))
    store.remove("cron:a")
    assert kept(store, "cron:a") == [entry_bytes("v1", 1)]
    assert cli(["restore", str(store.path.parent), "cron:a"]) == 0
    assert store.read("cron:a").data == entry_bytes("v1", 1)
    assert "restored the version current until" in capsys.readouterr().out


def test_restore_at_a_time_and_restore_is_undoable(
    store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write("cron:a", entry_bytes("v0", 0))
    time.sleep(0.02)
    store.write("cron:a", entry_bytes("v1", 1))  # v0 stops being current
    time.sleep(0.02)
    mark = time.time()  # v1 is current now
    time.sleep(0.02)
    store.write("cron:a", entry_bytes("v2", 2))  # v1 stops being current
    assert cli(["restore", str(store.path.parent), "cron:a", "--at", f"{mark:.3f}"]) == 0
    assert store.read("cron:a").data == entry_bytes("v1", 1)
    assert cli(["restore", str(store.path.parent), "cron:a"]) == 0  # undo the restore
    assert store.read("cron:a").data == entry_bytes("v2", 2)
    capsys.readouterr()


def test_a_rename_over_a_session_keeps_the_version_renamed_over(store: SessionStore) -> None:
    store.write("cron:a", entry_bytes("a", 1))
    store.write("cron:b", entry_bytes("b", 1))
    store.rename("cron:a", "cron:b")
    assert kept(store, "cron:b") == [entry_bytes("b", 1)]
    # the moved version lives on as cron:b (one file: a kept link to it would change
    # with every in-place write of cron:b); it is kept when cron:b changes
    assert kept(store, "cron:a") == []
    assert store.read("cron:b").data == entry_bytes("a", 1)


def test_old_versions_go_by_count_and_age(store: SessionStore) -> None:
    assert store.history is not None
    now = [1_800_000_000.0]
    store.history.clock = lambda: now[0]
    total = KEEP_NEWEST + PRUNE_SLACK + 5
    for i in range(total):
        store.write("cron:a", entry_bytes(f"v{i}", i))
        now[0] += 86400  # one a day: the oldest are over 30 days old by the end
    versions = kept(store, "cron:a")
    assert len(versions) < total - 1
    assert len(versions) >= KEEP_NEWEST  # never fewer than the newest 20
    assert versions[-1] == entry_bytes(f"v{total - 2}", total - 2)


def test_pruning_keeps_exactly_the_young_beyond_the_newest_20(store: SessionStore) -> None:
    """Two versions a day for 40 days, then one an hour: every version that stopped
    being current within 30 days stays (more than 20 of them), every older one goes."""
    assert store.history is not None
    start = 1_800_000_000.0
    times = [start + i * 43200 for i in range(80)] + [
        start + 40 * 86400 + h * 3600 for h in range(30)
    ]
    for i, when in enumerate(times):
        store.history.clock = lambda when=when: when  # type: ignore[misc]
        store.write("cron:a", entry_bytes(f"v{i}", i))
    now = times[-1]
    young = {stamp_of(t) + ".json" for t in times[1:] if now - t < 30 * 86400}
    assert len(young) > KEEP_NEWEST
    assert set(os.listdir(store.path / HISTORY_DIR / key_to_filename("cron:a"))) == young


def test_purge_removes_every_kept_version(
    store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write("cron:a", entry_bytes("secret", 1))
    store.write("cron:a", entry_bytes("clean", 2))
    assert cli(["history", str(store.path.parent), "cron:a", "--purge"]) == 0
    assert kept(store, "cron:a") == []
    assert cli(["restore", str(store.path.parent), "cron:a"]) == 1
    capsys.readouterr()


def test_maintenance_removals_are_restorable(
    store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    sixty_days_ago = int((time.time() - 60 * 86400) * 1000)
    store.write("cron:old", entry_bytes("old", sixty_days_ago))  # past the 30-day prune
    source = sources.resolve(store.path.parent)
    policy = maintain.Policy()
    (result,) = maintain.maintain_source(source, policy, maintain.Mode.ENFORCE)
    assert result.removed == ["cron:old"]
    assert cli(["restore", str(store.path.parent), "cron:old"]) == 0
    assert store.read("cron:old").data == entry_bytes("old", sixty_days_ago)
    capsys.readouterr()


def test_sigkill_between_the_link_and_the_rename(store: SessionStore) -> None:
    store.write("cron:a", entry_bytes("before", 1))
    crash = (
        "import os, signal, sys\n"
        "import sessionfs.store as s\n"
        "s.os.rename = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "store = s.SessionStore(sys.argv[1])\n"
        'store.write(\'cron:a\', b\'{"sessionId": "after", "updatedAt": 2}\')\n'
    )
    result = subprocess.run([sys.executable, "-c", crash, str(store.path)], cwd=REPO, check=False)
    assert result.returncode == -signal.SIGKILL
    assert store.read("cron:a").data == entry_bytes("before", 1)  # the entry stands
    assert kept(store, "cron:a") == [entry_bytes("before", 1)]  # one extra version at most


@pytest.mark.fuse
def test_edits_through_the_mount_are_kept(store: SessionStore, tmp_path: Path) -> None:
    store.write("cron:a", entry_bytes("v0", 0))
    with mounted(store.path.parent, tmp_path / "mnt") as mount:
        for i in (1, 2):
            (mount.path / "cron:a.json").write_bytes(entry_bytes(f"v{i}", i))
        (mount.path / "cron:a.json").unlink()
        assert not (mount.path / HISTORY_DIR).exists()  # not a session, not shown
    assert kept(store, "cron:a") == [entry_bytes(f"v{i}", i) for i in range(3)]
    assert not os.path.exists(store.path / "cron%3Aa.json")


def test_the_mount_shows_kept_versions_and_cp_of_one_undoes_an_edit(
    store: SessionStore, tmp_path: Path
) -> None:
    """Edit three times, see three old versions, ``cp`` one back; ``rm``, and the removed
    key's versions stay listed."""
    store.write("cron:a", entry_bytes("v0", 0))
    with mounted(store.path.parent, tmp_path / "mnt") as mount:
        session = mount.path / "cron:a.json"
        for i in (1, 2, 3):
            session.write_bytes(entry_bytes(f"v{i}", i))
        versions = mount.path / ".sessionfs" / "history" / "cron:a"
        names = sorted(os.listdir(versions))
        assert len(names) == 3
        assert all(name.endswith(".json") for name in names)
        assert [(versions / n).read_bytes() for n in names] == [
            entry_bytes(f"v{i}", i) for i in range(3)
        ]
        first = versions / names[0]
        assert first.stat().st_size == len(entry_bytes("v0", 0))
        assert first.stat().st_mode & 0o777 == 0o400
        with raises_errno(errno.EROFS):
            os.open(first, os.O_WRONLY)
        with raises_errno(errno.EROFS):
            first.unlink()
        with raises_errno(errno.EROFS):
            os.utime(first)
        with raises_errno(errno.EROFS):
            os.rename(first, versions / "x.json")
        subprocess.run(["cp", str(first), str(session)], check=True)  # the undo
        assert session.read_bytes() == entry_bytes("v0", 0)
        assert len(os.listdir(versions)) == 4  # the undo is a change like any other
        session.unlink()
        assert not session.exists()
        assert "cron:a" in os.listdir(mount.path / ".sessionfs" / "history")
        assert (versions / sorted(os.listdir(versions))[-1]).read_bytes() == entry_bytes("v0", 0)
        assert not (versions / "2000-01-01T00:00:00.000Z.json").exists()


def test_each_agent_has_its_history_in_a_state_dir_mount(state_dir: Path, tmp_path: Path) -> None:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        (session,) = [p for p in (mount.path / "main").iterdir() if p.suffix == ".json"][:1]
        old = session.read_bytes()
        data = orjson.loads(old)
        session.write_bytes(orjson.dumps({**data, "label": "edited"}))
        top = mount.path / ".sessionfs" / "history"
        assert "main" in os.listdir(top)
        (key_dir,) = os.listdir(top / "main")
        assert key_dir == session.name.removesuffix(".json")
        (version,) = os.listdir(top / "main" / key_dir)
        assert (top / "main" / key_dir / version).read_bytes() == old


def test_a_planted_symlink_is_never_followed_out_of_the_store(
    store: SessionStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / key_to_filename("cron:a")).mkdir(parents=True)
    (store.path / HISTORY_DIR).symlink_to(outside)
    store.write("cron:a", entry_bytes("v0", 0))
    store.write("cron:a", entry_bytes("v1", 1))  # the write goes on, nothing kept
    assert store.read("cron:a").data == entry_bytes("v1", 1)
    assert os.listdir(outside / key_to_filename("cron:a")) == []
    (store.path / HISTORY_DIR).unlink()
    (store.path / HISTORY_DIR).mkdir()
    (store.path / HISTORY_DIR / key_to_filename("cron:a")).symlink_to(outside)
    store.write("cron:a", entry_bytes("v2", 2))
    assert os.listdir(outside / key_to_filename("cron:a")) == []
    assert cli(["history", str(store.path.parent), "cron:a", "--purge"]) == 0
    assert (outside / key_to_filename("cron:a")).is_dir()  # nothing removed out there


def test_a_refused_change_leaves_no_kept_version(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write("cron:a", entry_bytes("v0", 0))

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.write("cron:a", entry_bytes("v1", 1))
    monkeypatch.undo()
    assert store.read("cron:a").data == entry_bytes("v0", 0)
    assert kept(store, "cron:a") == []  # the version was never replaced


def test_at_takes_the_times_history_prints(
    store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write("cron:a", entry_bytes("v0", 0))
    time.sleep(0.02)
    store.write("cron:a", entry_bytes("v1", 1))
    assert cli(["history", str(store.path.parent), "cron:a"]) == 0
    printed = capsys.readouterr().out.split()[0]  # when v0 stopped being current
    just_before = printed.replace("Z", "+00:00")
    assert cli(["restore", str(store.path.parent), "cron:a", "--at", just_before]) == 1
    assert cli(["restore", str(store.path.parent), "cron:a", "--at", "2000-01-01"]) == 1
    assert "no kept version current at that time" in capsys.readouterr().err
    assert cli(["restore", str(store.path.parent), "cron:a", "--at", "not a time"]) == 2


def test_a_removed_key_is_found_in_a_state_dir_without_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for agent in ("main", "work"):
        (tmp_path / "state" / "agents" / agent / "sessions").mkdir(parents=True)
    with SessionStore(tmp_path / "state/agents/work/sessions/sessions.d") as store:
        store.write("cron:gone", entry_bytes("g", 1))
        store.remove("cron:gone")
    assert cli(["restore", str(tmp_path / "state"), "cron:gone"]) == 0
    with SessionStore(tmp_path / "state/agents/work/sessions/sessions.d") as store:
        assert store.read("cron:gone").data == entry_bytes("g", 1)
    capsys.readouterr()


def test_the_disk_budget_counts_kept_versions_and_frees_them_before_any_session(
    store: SessionStore,
) -> None:
    now_ms = int(time.time() * 1000)
    for i in range(10):
        store.write(f"cron:{i}", entry_bytes(f"s{i}", now_ms - i))
    for i in range(20):  # 20 kept versions of 2 KB: far over the margin below
        store.write("cron:0", entry_bytes(f"v{i}", now_ms + i, pad="x" * 2000))
    entries = sum(p.stat().st_size for p in store.path.iterdir() if p.is_file())
    budget = int(entries / 0.8) + 4096  # the high water (80 %) above the entries alone
    source = sources.resolve(store.path.parent)
    policy = maintain.Policy(max_disk_bytes=budget)
    (planned,) = maintain.maintain_source(source, policy, maintain.Mode.WARN)
    assert planned.usage_bytes is not None
    assert planned.usage_bytes > entries + 19 * 2000  # the versions count
    (result,) = maintain.maintain_source(source, policy, maintain.Mode.ENFORCE)
    assert result.removed == []  # every session stays: kept versions went first
    assert len(list(store.keys())) == 10
    assert 0 < result.pruned_versions <= 20
    assert len(kept(store, "cron:0")) == 20 - result.pruned_versions
    # a budget below the sessions themselves: the oldest go, and are not kept (a kept
    # version would free nothing)
    tight = maintain.Policy(max_disk_bytes=int(entries / 2))
    (result,) = maintain.maintain_source(source, tight, maintain.Mode.ENFORCE)
    assert result.removed
    for key in result.removed:
        assert kept(store, key) == []


def test_maintain_prunes_versions_past_their_retention(store: SessionStore) -> None:
    """A live key keeps its newest N; a removed key's versions stay for their age only."""
    assert store.history is not None
    now = time.time()
    clock = [now - 40 * 86400]
    store.history.clock = lambda: clock[0]
    for i in range(6):  # five versions kept 40 days ago
        store.write("cron:live", entry_bytes(f"v{i}", i))
    store.write("cron:gone", entry_bytes("g", 1))
    store.remove("cron:gone")  # kept 40 days ago
    clock[0] = now
    store.write("cron:live", entry_bytes("fresh", 99))  # kept now: young
    source = sources.resolve(store.path.parent)
    policy = maintain.Policy(history=Retention(keep_newest=2, keep_seconds=30 * 86400))
    (result,) = maintain.maintain_source(source, policy, maintain.Mode.ENFORCE)
    assert result.pruned_versions == 5  # 4 old ones of cron:live, and cron:gone's
    assert kept(store, "cron:live") == [entry_bytes("v4", 4), entry_bytes("v5", 5)]
    assert kept(store, "cron:gone") == []


def test_no_history_keeps_no_version_but_audits(
    store: SessionStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write("cron:a", entry_bytes("v0", 0))
    with mounted(store.path.parent, tmp_path / "mnt", "--no-history") as mount:
        (mount.path / "cron:a.json").write_bytes(entry_bytes("v1", 1))
    assert kept(store, "cron:a") == []
    assert [line["op"] for line in audit_lines(store)] == ["written"]


def audit_lines(store: SessionStore) -> list[dict[str, object]]:
    assert store.history is not None
    return store.history.audit()


def test_audit_lines_name_the_program_and_pid_of_each_change(
    store: SessionStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cp`` and Python write through the mount, ``mv`` renames, ``rm`` removes: the
    audit names each program and its pid, ``.sessionfs/audit`` shows the lines, and
    ``sessionfs log`` tells them apart from a change made outside the mount."""
    store.write("cron:a", entry_bytes("v0", 0))
    source = tmp_path / "new.json"
    source.write_bytes(entry_bytes("by-cp", 1))
    with mounted(store.path.parent, tmp_path / "mnt") as mount:
        session = mount.path / "cron:a.json"
        subprocess.run(["cp", str(source), str(session)], check=True)
        writer = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import os; open({str(session)!r}, 'wb').write("
                f"{entry_bytes('by-python', 2)!r}); print(os.getpid())",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        subprocess.run(["mv", str(session), str(mount.path / "cron:b.json")], check=True)
        subprocess.run(["rm", str(mount.path / "cron:b.json")], check=True)
        shown = [
            orjson.loads(line)
            for line in (mount.path / ".sessionfs" / "audit").read_bytes().splitlines()
        ]
        assert [line["op"] for line in shown] == ["written", "written", "renamed", "removed"]
        # held back in batches, but on disk within seconds while the mount goes on
        wait_for(lambda: len(audit_lines(store)) == 4, timeout=5, what="the audit on disk")
    lines = audit_lines(store)
    assert [(line["program"], line["op"]) for line in lines] == [
        ("cp", "written"),
        (Path(sys.executable).name[:15], "written"),  # (the kernel's comm: 15 bytes)
        ("mv", "renamed"),
        ("rm", "removed"),
    ]
    assert lines[1]["pid"] == int(writer.stdout)
    assert lines[0]["uid"] == os.getuid()
    assert lines[2]["renamed_from"] == "cron:a"
    assert lines[2]["key"] == "cron:b"
    # each kept what it replaced (the rename to a new key replaced nothing)
    assert [line["old"] is not None for line in lines] == [True, True, False, True]
    store.write("cron:a", entry_bytes("outside", 3))  # the store API: kept, not audited
    store.write("cron:a", entry_bytes("outside-again", 4))
    assert cli(["log", str(store.path.parent), "--key", "cron:a"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "outside" in out[0]
    assert "replaced" in out[0]
    assert "sessionId" in out[0]
    assert any("cp[" in line and "written" in line and "sessionId" in line for line in out)
    assert any(f"{Path(sys.executable).name[:15]}[{int(writer.stdout)}]" in line for line in out)
    assert any("mv[" in line and "renamed" in line for line in out)
    assert cli(["log", str(store.path.parent), "--key", "cron:b"]) == 0
    assert "rm[" in capsys.readouterr().out


def test_a_vim_save_is_audited_as_vim(state_dir: Path, tmp_path: Path) -> None:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        result = vim_save(mount.path / "main", "agent:main:main.json", "no")
        assert result.returncode == 0, result.stdout + result.stderr
    with SessionStore(state_dir / "agents/main/sessions/sessions.d") as store:
        lines = audit_lines(store)
    assert [(line["program"], line["op"], line["key"]) for line in lines] == [
        ("vim", "written", "agent:main:main")
    ]
    assert isinstance(lines[0]["pid"], int)
    assert lines[0]["old"] is not None  # the version before the save is kept


def test_maintenance_removals_are_in_the_log(
    store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    sixty_days_ago = int((time.time() - 60 * 86400) * 1000)
    store.write("cron:old", entry_bytes("old", sixty_days_ago))
    source = sources.resolve(store.path.parent)
    maintain.maintain_source(source, maintain.Policy(), maintain.Mode.ENFORCE)
    (line,) = audit_lines(store)
    assert line["op"] == "removed by maintenance"
    assert line["program"] == "sessionfs maintain"
    assert cli(["log", str(store.path.parent), "--json"]) == 0
    (change,) = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert change["what"] == "removed by maintenance"
    assert change["key"] == "cron:old"


def test_the_mount_shows_recent_audit_lines_from_before_it_too(
    store: SessionStore, tmp_path: Path
) -> None:
    store.write("cron:a", entry_bytes("v0", 0), actor=Actor(0, 1, "earlier"))
    store.close()  # (flushes its audit)
    with mounted(store.path.parent, tmp_path / "mnt") as mount:
        (mount.path / "cron:a.json").write_bytes(entry_bytes("v1", 1))
        lines = mount_audit(mount.path)
        assert [line["program"] for line in lines[:1]] == ["earlier"]
        assert len(lines) == 2
        assert (mount.path / ".sessionfs" / "audit").stat().st_size == 0  # (read to know)


def test_a_fifo_planted_as_the_audit_never_holds_a_change(store: SessionStore) -> None:
    """Opened without O_NONBLOCK, a FIFO with no reader would block the commit (and its
    key's lock, and the mount's unmount) until someone read it."""
    (store.path / HISTORY_DIR).mkdir(exist_ok=True)
    os.mkfifo(store.path / HISTORY_DIR / "audit.jsonl")
    script = (
        "import sys\n"
        "from sessionfs.history import Actor\n"
        "from sessionfs.store import SessionStore\n"
        "with SessionStore(sys.argv[1]) as s:\n"
        '    data = b\'{"sessionId": "a", "updatedAt": 1}\'\n'
        "    s.write('cron:a', data, actor=Actor(0, 1, 't'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(store.path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "not a regular file" in result.stderr or "No such device" in result.stderr
    assert store.read("cron:a").data == b'{"sessionId": "a", "updatedAt": 1}'


def test_the_audit_is_not_counted_in_the_disk_budget(store: SessionStore) -> None:
    """Nothing the budget may do frees the audit: counted, it would remove every session."""
    now_ms = int(time.time() * 1000)
    for i in range(10):
        store.write(f"cron:{i}", entry_bytes(f"s{i}", now_ms - i))
    entries = sum(p.stat().st_size for p in store.path.iterdir() if p.is_file())
    (store.path / HISTORY_DIR).mkdir(exist_ok=True)
    (store.path / HISTORY_DIR / "audit.jsonl").write_bytes(b"{}\n" * 30_000)
    policy = maintain.Policy(max_disk_bytes=entries * 4)
    (result,) = maintain.maintain_source(
        sources.resolve(store.path.parent), policy, maintain.Mode.ENFORCE
    )
    assert result.removed == []
    assert len(list(store.keys())) == 10


def test_a_store_keeping_no_newest_still_prunes_by_age(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    with SessionStore(
        tmp_path / "s" / "sessions.d", retention=Retention(keep_newest=0, keep_seconds=0)
    ) as store:
        assert store.history is not None
        now = [1_800_000_000.0]
        store.history.clock = lambda: now[0]
        for i in range(40):
            store.write("cron:a", entry_bytes(f"v{i}", i))
            now[0] += 120
        assert len(kept(store, "cron:a")) <= PRUNE_SLACK + 1


def test_malformed_audit_lines_are_skipped(
    store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write("cron:a", entry_bytes("v0", 0), actor=Actor(0, 1, "t"))
    store.close()  # (flushes the audit)
    audit = store.path / HISTORY_DIR / "audit.jsonl"
    with open(audit, "ab") as f:
        f.write(b'{"key": ["x"], "old": "a", "time": "t"}\nnot json\n{"key": "k", "pid": "1"}\n')
    with SessionStore(store.path) as again:
        assert [line["key"] for line in audit_lines(again)] == ["cron:a"]
    assert cli(["log", str(store.path.parent)]) == 0
    assert "cron:a" in capsys.readouterr().out


def test_truncate_by_path_and_grace_ends_are_audited(state_dir: Path, tmp_path: Path) -> None:
    """truncate(2) through the mount names its caller; a session renamed away and not
    written anew is removed by the daemon, named with its own pid (it forks at mount)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    assert mounting_sessionfs("mount", str(state_dir), str(mountpoint)).returncode == 0
    try:
        session = mountpoint / "main" / "agent:main:main.json"
        data = session.read_bytes()
        session.write_bytes(data + b"   ")
        os.truncate(session, len(data))
        daemon_pid = int((mountpoint / ".sessionfs" / "pid").read_text())
        os.rename(session, mountpoint / "main" / "agent:main:main.json.bak")
        wait_for(lambda: not session.exists() and len(mount_audit(mountpoint)) == 3, timeout=10)
        lines = mount_audit(mountpoint)
    finally:
        mounting_sessionfs("umount", str(mountpoint))
    assert [line["op"] for line in lines] == [
        "written",
        "written",
        "removed: renamed away and not written anew",
    ]
    assert lines[1]["pid"] == os.getpid()
    assert lines[2]["pid"] == daemon_pid


def mount_audit(mountpoint: Path) -> list[dict[str, object]]:
    raw = (mountpoint / ".sessionfs" / "audit").read_bytes()
    return [orjson.loads(line) for line in raw.splitlines()]


def test_a_partly_read_history_listing_leaves_no_nodes_behind(
    store: SessionStore, tmp_path: Path
) -> None:
    store.write("cron:a", entry_bytes("v", 1))
    folder = store.path / HISTORY_DIR / key_to_filename("cron:a")
    folder.mkdir(parents=True)
    for i in range(3000):  # more than one getdents buffer (32 KiB) of names
        (folder / (stamp_of(1_800_000_000 + i) + ".json")).write_bytes(entry_bytes("v", i))
    with mounted(store.path.parent, tmp_path / "mnt") as mount:
        versions = mount.path / ".sessionfs" / "history" / "cron:a"
        inodes = mount.stats()["now"]["inodes"]
        with os.scandir(versions) as listing:
            next(listing)  # one buffer's worth is replied; the rest never is
        after = mount.stats()["now"]["inodes"]
        assert after - inodes < 1500  # not one per version (3000)


@pytest.mark.parametrize("same_millisecond", [False, True])
def test_recent_audit_reads_files_without_opening_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_millisecond: bool
) -> None:
    """``.sessionfs/audit`` of a state dir: every agent's newest lines, each with its real
    agent (not one a line claims), never a store opened for it; lines whose time is not a
    stamp are skipped (one could otherwise sort after every real line).  Two agents'
    lines of one millisecond keep the order they were read in."""
    if same_millisecond:
        monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    state = tmp_path / "state"
    for agent in ("a", "b"):
        (state / "agents" / agent / "sessions").mkdir(parents=True)
        with SessionStore(state / "agents" / agent / "sessions" / "sessions.d") as store:
            store.write(f"agent:{agent}:main", entry_bytes(agent, 1), actor=Actor(0, 1, agent))
    audit = state / "agents/a/sessions/sessions.d" / HISTORY_DIR / "audit.jsonl"
    with open(audit, "ab") as f:
        f.write(b'{"key": "k", "time": "Z", "op": "written"}\n')
        f.write(orjson.dumps({**audit_lines_of(audit)[0], "agent": "b", "op": "planted"}))
    catalog = Catalog(sources.resolve(state))
    lines = catalog.recent_audit()
    assert not catalog._open  # nothing was opened to read them
    assert [(line["agent"], line["program"]) for line in lines if line["op"] == "written"] == [
        ("a", "a"),
        ("b", "b"),
    ]
    assert [line["agent"] for line in lines if line["op"] == "planted"] == ["a"]
    assert all(line["time"] != "Z" for line in lines)


def audit_lines_of(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_an_unterminated_older_audit_does_not_swallow_the_newer_first_line(
    store: SessionStore,
) -> None:
    store.write("cron:a", entry_bytes("v0", 0), actor=Actor(0, 1, "first"))
    store.write("cron:a", entry_bytes("v1", 1), actor=Actor(0, 1, "second"))
    store.close()
    history = store.path / HISTORY_DIR
    first, second = (history / "audit.jsonl").read_bytes().splitlines()
    (history / "audit.1.jsonl").write_bytes(first)  # a crash mid-append: no newline
    (history / "audit.jsonl").write_bytes(second + b"\n")
    with SessionStore(store.path) as again:
        assert [line["program"] for line in audit_lines(again)] == ["first", "second"]


def test_a_restored_session_takes_its_activity_time_as_mtime(store: SessionStore) -> None:
    day_ms = int(time.time() * 1000) - 86_400_000
    store.write("cron:a", entry_bytes("old", day_ms))
    store.write("cron:a", entry_bytes("new", day_ms + 1000))
    assert cli(["restore", str(store.path.parent), "cron:a"]) == 0
    assert (store.path / "cron%3Aa.json").stat().st_mtime_ns == day_ms * 1_000_000


def test_an_audit_rotated_by_another_process_is_not_rotated_again(tmp_path: Path) -> None:
    """Two processes fill the audit past its size together; one renames it to
    audit.1.jsonl and a third starts a new one: the second must not put that small new
    file over the full older one."""
    from sessionfs.history import AUDIT_FILE, AUDIT_OLDER, History

    history = tmp_path / HISTORY_DIR
    history.mkdir()
    (history / AUDIT_FILE).write_bytes(b"full\n")
    full = os.stat(history / AUDIT_FILE)
    os.rename(history / AUDIT_FILE, history / AUDIT_OLDER)  # the other process's rotation
    (history / AUDIT_FILE).write_bytes(b"new\n")
    fd = os.open(history, os.O_RDONLY | os.O_DIRECTORY)
    try:
        History._rotate_audit(fd, full)  # what this process saw when it wrote
        assert (history / AUDIT_OLDER).read_bytes() == b"full\n"
        assert (history / AUDIT_FILE).read_bytes() == b"new\n"
        History._rotate_audit(fd, os.stat(history / AUDIT_FILE))  # its own, full: rotated
        assert (history / AUDIT_OLDER).read_bytes() == b"new\n"
        assert not (history / AUDIT_FILE).exists()
        History._rotate_audit(fd, full)  # nothing there any more: nothing to do
    finally:
        os.close(fd)
