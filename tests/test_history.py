"""Kept versions: every change through the store keeps what it replaced, and can be undone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sessionfs import maintain, sources
from sessionfs.cli import main as cli
from sessionfs.history import HISTORY_DIR, KEEP_NEWEST, PRUNE_SLACK
from sessionfs.keys import key_to_filename
from sessionfs.store import SessionStore
from tests.helpers import entry_bytes
from tests.mounting import mounted

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    (tmp_path / "sessions").mkdir()
    return SessionStore(tmp_path / "sessions" / "sessions.d")


def kept(store: SessionStore, key: str) -> list[bytes]:
    assert store.history is not None
    name = key_to_filename(key)
    return [store.history.read(name, k) for k in store.history.versions(name)]


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


def test_a_rename_over_a_session_keeps_both_old_versions(store: SessionStore) -> None:
    store.write("cron:a", entry_bytes("a", 1))
    store.write("cron:b", entry_bytes("b", 1))
    store.rename("cron:a", "cron:b")
    assert kept(store, "cron:b") == [entry_bytes("b", 1)]
    assert kept(store, "cron:a") == [entry_bytes("a", 1)]
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
