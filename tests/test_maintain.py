"""Maintenance on sessions.d/: prune, cap, disk budget, transcript archival, concurrency."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from sessionfs import sources
from sessionfs.cli import main as cli
from sessionfs.maintain import DAY_MS, Mode, Policy, maintain_source
from sessionfs.store import SessionStore, Snapshot
from tests.helpers import entry_bytes
from tests.mounting import mounted, wait_for
from tests.test_migrate import snapshot

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def make_store(
    tmp_path: Path, entries: dict[str, dict[str, Any]], transcripts: dict[str, int] | None = None
) -> Path:
    """A sessions dir: *entries* by key, and transcript files (name -> size)."""
    sessions = tmp_path / "state" / "agents" / "main" / "sessions"
    sessions.mkdir(parents=True)
    with SessionStore(sessions / "sessions.d") as store:
        for key, value in entries.items():
            store.write(key, orjson.dumps(value), validate=False)
    for name, size in (transcripts or {}).items():
        (sessions / name).write_bytes(b"x" * size)
    return sessions


def aged(days: float | None, sid: str, **extra: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"sessionId": sid, **extra}
    if days is not None:
        value["updatedAt"] = NOW_MS - int(days * DAY_MS)
    return value


def run(sessions: Path, mode: Mode = Mode.ENFORCE, **policy: Any) -> Any:
    (result,) = maintain_source(
        sources.resolve(sessions.parent.parent.parent), Policy(**policy), mode, now=NOW
    )
    return result


def keys(sessions: Path) -> set[str]:
    with SessionStore(sessions / "sessions.d", create=False) as store:
        return set(store.keys())


def test_prune_boundary(tmp_path: Path) -> None:
    sessions = make_store(
        tmp_path,
        {
            "fresh": aged(29.9, "a"),
            "stale": aged(30.1, "b"),
            "undated": aged(None, "c"),
            "ancient": aged(400, "d"),
        },
    )
    result = run(sessions)
    assert sorted(result.removed) == ["ancient", "stale"]
    assert keys(sessions) == {"fresh", "undated"}  # entries without updatedAt are never pruned
    reasons = {r.entry.key: r.reason for r in result.removals}
    assert reasons["stale"] == "last updated 30.1 days ago (prune after 30.0 days)"


def test_cap_keeps_the_newest_and_drops_undated_first(tmp_path: Path) -> None:
    entries = {f"k{i}": aged(i, f"s{i}") for i in range(6)}  # k0 newest
    entries["undated"] = aged(None, "u")
    sessions = make_store(tmp_path, entries)
    result = run(sessions, max_entries=4)
    assert keys(sessions) == {"k0", "k1", "k2", "k3"}
    assert [r.entry.key for r in result.removals] == ["undated", "k5", "k4"]
    assert all("over the cap of 4 entries" in r.reason for r in result.removals)


def test_transcripts_are_archived_unless_shared(tmp_path: Path) -> None:
    sessions = make_store(
        tmp_path,
        {
            "old": aged(40, "t-old"),
            "old-shared": aged(40, "t-shared"),
            "keeper": aged(1, "t-shared"),
        },
        {"t-old.jsonl": 10, "t-old-topic-7.jsonl": 5, "t-shared.jsonl": 10, "other.jsonl": 3},
    )
    result = run(sessions)
    assert sorted(result.removed) == ["old", "old-shared"]
    stamp = "2026-11-24T12-00-00.000Z"  # OpenClaw's archive names: ISO time, ':' as '-'
    assert (sessions / f"t-old.jsonl.deleted.{stamp}").exists()
    assert (sessions / f"t-old-topic-7.jsonl.deleted.{stamp}").exists()
    assert not (sessions / "t-old.jsonl").exists()
    assert (sessions / "t-shared.jsonl").exists()  # still the transcript of "keeper"
    assert (sessions / "other.jsonl").exists()  # not ours to touch without a budget
    assert sorted(result.archived) == ["t-old-topic-7.jsonl", "t-old.jsonl"]


def test_disk_budget_order_and_stop_point(tmp_path: Path) -> None:
    sessions = make_store(
        tmp_path,
        {f"k{i}": aged(i + 1, f"live{i}", pad="p" * 900) for i in range(5)},
        {
            "live0.jsonl": 2000,
            "orphan-new.jsonl": 3000,
            "orphan-old.jsonl": 3000,
            "a.jsonl.deleted.2026-01-01T00-00-00.000Z": 4000,
            "b.jsonl.reset.2026-02-01T00-00-00.000Z": 4000,
        },
    )
    recent_backup = f"sessions.json.bak.{NOW_MS - DAY_MS}"
    old_backup = f"sessions.json.bak.{NOW_MS - 40 * DAY_MS}"
    (sessions / recent_backup).write_bytes(b"b" * 5000)
    (sessions / old_backup).write_bytes(b"b" * 1000)
    stamps = {
        "a.jsonl.deleted.2026-01-01T00-00-00.000Z": 100,
        old_backup: 200,
        "b.jsonl.reset.2026-02-01T00-00-00.000Z": 300,
        "orphan-old.jsonl": 400,
        "orphan-new.jsonl": 500,
    }
    for name, t in stamps.items():
        os.utime(sessions / name, (t, t))
    usage = sum(f.stat().st_size for f in sessions.rglob("*") if f.is_file())
    # a budget whose high water needs the archives, the old backup and one orphan gone
    freed_needed = 4000 + 1000 + 4000 + 1
    high = usage - freed_needed
    result = run(sessions, max_disk_bytes=int(high / 0.8) + 1)
    assert [d.name for d in result.deletions] == [
        "a.jsonl.deleted.2026-01-01T00-00-00.000Z",
        old_backup,
        "b.jsonl.reset.2026-02-01T00-00-00.000Z",
        "orphan-old.jsonl",
    ]
    assert (sessions / "orphan-new.jsonl").exists()  # the stop point was reached before it
    assert (sessions / recent_backup).exists()  # a fresh migration backup is never deleted
    assert keys(sessions) == {f"k{i}" for i in range(5)}
    # a budget so tight that the oldest entries go too, transcripts archived first
    result = run(sessions, max_disk_bytes=1)
    assert "k4" in result.removed
    assert (sessions / recent_backup).exists()
    assert result.removals[0].reason.startswith("disk budget")


def test_warn_and_dry_run_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions = make_store(
        tmp_path, {"stale": aged(90, "t"), "fresh": aged(1, "f")}, {"t.jsonl": 10}
    )
    state = sessions.parent.parent.parent
    before = snapshot(state)
    assert cli(["maintain", str(state)]) == 1  # warn: something would be removed
    out = capsys.readouterr().out
    assert "main: would remove 1 entries, archive 1 transcripts" in out
    assert "remove 'stale': last updated" in out
    assert cli(["maintain", str(state), "--mode", "enforce", "--dry-run"]) == 1
    assert snapshot(state) == before
    assert cli(["maintain", str(state), "--mode", "enforce"]) == 1
    assert keys(sessions) == {"fresh"}
    assert cli(["maintain", str(state), "--mode", "enforce"]) == 0  # nothing left to do
    assert "main: removed 0 entries" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["--prune-after", "soon"],
        ["--max-disk-bytes", "lots"],
        ["--mode", "x"],
        ["--max-entries", "-1"],
        ["--max-disk-bytes", "-5"],
        ["--high-water", "0"],
        ["--high-water", "150"],
    ],
)
def test_maintain_usage_errors(tmp_path: Path, args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli(["maintain", str(tmp_path), *args])
    assert info.value.code == 2


def test_updated_entry_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sessionfs import maintain

    sessions = make_store(tmp_path, {"stale": aged(90, "t"), "also-stale": aged(80, "u")})
    real_enforce = maintain.enforce

    def update_then_enforce(agent: Any, result: Any, *, now: dt.datetime, **kwargs: Any) -> None:
        with SessionStore(sessions / "sessions.d") as store:  # the gateway touches it meanwhile
            store.write("stale", entry_bytes("t", updated_at=NOW_MS))
        real_enforce(agent, result, now=now)

    monkeypatch.setattr(maintain, "enforce", update_then_enforce)
    result = run(sessions)
    assert result.removed == ["also-stale"]
    assert result.skipped == [("stale", "updated since the plan")]
    assert keys(sessions) == {"stale"}


def test_writer_of_another_key_waits_for_at_most_one_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = make_store(
        tmp_path, {f"old{i}": aged(90, f"s{i}") for i in range(6)} | {"live": aged(1, "l")}
    )
    real_delete = SessionStore.delete
    slow = 0.15

    def slow_delete(self: SessionStore, key: str, *, only_if: Any = None, **kwargs: Any) -> bool:
        def held(snap: Snapshot) -> bool:
            time.sleep(slow)  # runs under the key's lock
            return bool(only_if(snap)) if only_if else True

        return real_delete(self, key, only_if=held, **kwargs)

    monkeypatch.setattr(SessionStore, "delete", slow_delete)
    latencies: list[float] = []
    done = threading.Event()

    def writer() -> None:
        with SessionStore(sessions / "sessions.d") as store:
            while not done.is_set():
                start = time.monotonic()
                store.write("live", entry_bytes("l", updated_at=NOW_MS))
                latencies.append(time.monotonic() - start)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = run(sessions)
    finally:
        done.set()
        thread.join()
    assert len(result.removed) == 6  # the run took at least 6 * 0.15 s ...
    assert len(latencies) > 6
    assert max(latencies) < slow  # ... and the writer never waited for a delete


@pytest.mark.fuse
def test_daemon_maintains_in_the_background_and_the_mount_shows_it(tmp_path: Path) -> None:
    sessions = make_store(
        tmp_path, {"agent:main:stale": aged(90, "t"), "agent:main:fresh": aged(1, "f")}
    )
    state = sessions.parent.parent.parent
    with mounted(
        state, tmp_path / "mnt", "--maintain-every", "1s", "--maintain-mode", "enforce"
    ) as mount:
        stale = mount.path / "main" / "agent:main:stale.json"
        assert stale.read_bytes()
        with open(
            mount.path / "main" / "agent:main:stale.json", "r+b"
        ):  # open for writing: still removed
            wait_for(lambda: not stale.exists(), timeout=10, what="the background run to remove it")
        wait_for(lambda: "maintenance (enforce): " in mount.log_text(), what="its log line")
        runs = [line for line in mount.log_text().splitlines() if "maintenance (enforce): " in line]
        assert "maintenance (enforce): main: removed 1 entries" in runs[0]  # one line per run
        assert (mount.path / "main" / "agent:main:fresh.json").exists()


def test_implausible_updated_at_is_reported_never_pruned(tmp_path: Path) -> None:
    seconds = {"sessionId": "s", "updatedAt": NOW_MS // 1000}  # a hand-editing slip
    future = {"sessionId": "f", "updatedAt": NOW_MS + 400 * DAY_MS}
    sessions = make_store(tmp_path, {"seconds": seconds, "future": future, "stale": aged(90, "t")})
    result = run(sessions, max_entries=0, max_disk_bytes=1)
    assert result.removed == ["stale"]
    assert keys(sessions) == {"seconds", "future"}
    lines = "\n".join(result.lines())
    assert "not removed 'seconds': updatedAt 1795521600 is before the year 2000" in lines
    assert "(seconds instead of milliseconds?)" in lines
    assert "not removed 'future'" in lines


def test_enforce_failing_midway_keeps_the_record_of_what_it_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = make_store(tmp_path, {"a": aged(90, "a"), "b": aged(91, "b"), "c": aged(1, "c")})
    real_delete = SessionStore.delete
    calls = []

    def delete_then_fail(self: SessionStore, key: str, **kwargs: Any) -> bool:
        calls.append(key)
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        return real_delete(self, key, **kwargs)

    monkeypatch.setattr(SessionStore, "delete", delete_then_fail)
    result = run(sessions)
    assert len(result.removed) == 1
    assert result.error == "[Errno 5] Input/output error"
    assert "before that it removed 1 entries" in result.summary()


def test_a_session_created_while_planning_keeps_its_transcript(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sessionfs import maintain

    sessions = make_store(tmp_path, {"old": aged(1, "old")}, {"old.jsonl": 100})
    real_read = maintain.read_entries

    def gateway_creates_a_session(store: SessionStore) -> Any:
        found = real_read(store)  # the entries as read
        (sessions / "new.jsonl").write_bytes(b"x" * 5000)  # then a session starts
        store.write("new", entry_bytes("new", updated_at=NOW_MS))
        return found

    monkeypatch.setattr(maintain, "read_entries", gateway_creates_a_session)
    result = run(sessions, max_disk_bytes=1000)
    assert (sessions / "new.jsonl").exists()
    assert "new.jsonl" not in result.deleted


def test_maintain_of_a_missing_source_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not 1, which would say that something was removed."""
    assert cli(["maintain", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["maintain", str(tmp_path), "--dry-run"]) == 2
    assert "holds no session store" in capsys.readouterr().err
