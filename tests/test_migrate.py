"""Migration of legacy sessions.json stores: contents, folding, merging, locks, crashes."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionfs import entry as entry_rules
from sessionfs import migrate, sources
from sessionfs.cli import main as cli
from sessionfs.demo import write_legacy_store
from sessionfs.keys import key_to_filename, normalize_key
from sessionfs.migrate import Outcome, migrate_source, migrate_store, plan
from sessionfs.sources import AgentStore
from sessionfs.store import SessionStore
from tests.helpers import entry

REPO = Path(__file__).parent.parent


def snapshot(root: Path) -> dict[str, str]:
    """Every path under *root* with a hash of its content (or its kind)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "symlink:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def backups(sessions_dir: Path) -> list[Path]:
    return sorted(sessions_dir.glob("sessions.json.bak.*"))


def live_entries(sessions_dir: Path) -> dict[str, Any]:
    with SessionStore(sessions_dir / "sessions.d", create=False) as store:
        return {key: orjson.loads(store.read(key).data) for key, _ in store.scan()}


def assert_migrated(sessions_dir: Path, original: bytes) -> None:
    """The end state of a complete migration of *original*: nothing lost, nothing stale."""
    legacy = orjson.loads(original)
    expected = plan(legacy)
    assert not (sessions_dir / "sessions.json").exists()
    assert not (sessions_dir / "sessions.d.migrating").exists()
    (backup,) = backups(sessions_dir)
    assert backup.read_bytes() == original
    assert live_entries(sessions_dir) == expected.entries
    for key, value in expected.entries.items():
        raw = (sessions_dir / "sessions.d" / key_to_filename(key)).read_bytes()
        assert raw == orjson.dumps(value, option=orjson.OPT_INDENT_2)  # OpenClaw's format
    assert not [n for n in os.listdir(sessions_dir / "sessions.d") if n.endswith(".tmp")]


def test_fixture_state_migrates_completely(state_dir: Path) -> None:
    main_dir = state_dir / "agents/main/sessions"
    originals = {
        a: (state_dir / f"agents/{a}/sessions/sessions.json").read_bytes() for a in ("main", "work")
    }
    others_before = {k: v for k, v in snapshot(state_dir).items() if "sessions.json" not in k}

    reports = migrate_source(sources.resolve(state_dir), progress=None)

    assert [(r.label, r.outcome) for r in reports] == [
        ("main", Outcome.MIGRATED),
        ("work", Outcome.MIGRATED),
    ]
    for agent, original in originals.items():
        assert_migrated(state_dir / f"agents/{agent}/sessions", original)
    legacy = orjson.loads(originals["main"])
    live = live_entries(main_dir)
    assert len(legacy) == 42
    assert len(live) == 41  # James and james are one session to the gateway
    assert reports[0].migrated == 41
    # every key the gateway looks up carries its original object, byte-parsed
    for key in (
        "__proto__",
        "hook:100%done",
        "agent:main:webchat:direct:zoë 東京",
        "agent:main:discord:channel:a/b\\c",
        "agent:main:matrix:channel:!AbCdEfGh:matrix.org",
        "agent:main:signal:group:QUJDREVGR0g=",
        "agent:main:email:direct:ann@example.com",
    ):
        assert live[key] == legacy[key]
    # an entry without updatedAt is carried over as it is
    assert "updatedAt" not in live["agent:main:slack:direct:noupdate"]
    # transcripts and every other file are untouched
    after = snapshot(state_dir)
    for path, digest in others_before.items():
        if "/sessions.d" not in path:
            assert after[path] == digest, path


def test_case_variants_fold_to_the_newest(state_dir: Path) -> None:
    legacy = orjson.loads((state_dir / "agents/main/sessions/sessions.json").read_bytes())
    lower, upper = "agent:main:telegram:direct:james", "agent:main:telegram:direct:James"
    newer = max((lower, upper), key=lambda k: legacy[k]["updatedAt"])
    older = upper if newer == lower else lower
    (report, _) = migrate_source(sources.resolve(state_dir), progress=None)
    live = live_entries(state_dir / "agents/main/sessions")
    assert live[lower] == legacy[newer]
    assert upper not in live
    (fold,) = report.folded
    assert (fold.key, fold.winner, fold.loser) == (lower, newer, older)
    assert any(older in line and "backup" in line for line in report.lines())


def test_plan_fold_rules() -> None:
    legacy = {
        "agent:x:telegram:direct:Bob": entry("a", 5),
        "agent:x:telegram:direct:bob": entry("b", 9),
        "agent:x:telegram:direct:BOB": {"sessionId": "c"},  # no updatedAt: loses to any with one
        "agent:x:signal:group:AbC=": entry("d", 1),  # the group id keeps its case
        "agent:x:signal:group:abc=": entry("e", 1),
        "agent:x:matrix:channel:!Room:Srv": entry("f", 1),
        "Agent:X:Main": entry("g", 1),  # alone, but not the spelling the gateway looks up
        "nope": [1, 2],
        "x" * 300: entry("h", 1),
        "   ": entry("i", 1),
    }
    result = plan(legacy)
    assert result.entries == {
        "agent:x:telegram:direct:bob": entry("b", 9),
        "agent:x:signal:group:AbC=": entry("d", 1),
        "agent:x:signal:group:abc=": entry("e", 1),
        "agent:x:matrix:channel:!Room:Srv": entry("f", 1),
        "agent:x:main": entry("g", 1),
    }
    assert {f.loser for f in result.folded} == {
        "agent:x:telegram:direct:Bob",
        "agent:x:telegram:direct:BOB",
    }
    assert result.renamed == [("Agent:X:Main", "agent:x:main")]
    skipped = dict(result.skipped)
    assert set(skipped) == {"nope", "x" * 300, "   "}
    assert "not an object" in skipped["nope"]
    assert "255" in skipped["x" * 300]


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="aAbB:.%/ ", min_size=0, max_size=6),
        st.one_of(
            st.builds(entry, st.just("s"), st.integers(0, 5)),
            st.none(),
            st.just({"sessionId": "x"}),
        ),
        max_size=8,
    )
)
def test_plan_accounts_for_every_legacy_key(legacy: dict[str, Any]) -> None:
    """Nothing lost: each key is live under its lookup key, folded or skipped (in the backup)."""
    result = plan(legacy)
    folded = {f.loser for f in result.folded}
    skipped = {k for k, _ in result.skipped}
    winners = {f.winner for f in result.folded} | {
        k for k in legacy if normalize_key(k) in result.entries
    }
    for key, value in legacy.items():
        assert (
            key in folded
            or key in skipped
            or (key in winners and result.entries[normalize_key(key)] is value)
        )


def test_second_run_changes_nothing(state_dir: Path) -> None:
    migrate_source(sources.resolve(state_dir), progress=None)
    before = snapshot(state_dir)
    reports = migrate_source(sources.resolve(state_dir), progress=None)
    assert {r.outcome for r in reports} == {Outcome.NOTHING_TO_DO}
    assert snapshot(state_dir) == before


def test_dry_run_touches_nothing(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(state_dir)
    assert cli(["migrate", str(state_dir), "--dry-run"]) == 0
    assert snapshot(state_dir) == before
    out = capsys.readouterr().out
    assert "main: would migrate 41 entries" in out
    assert "work: would migrate 7 entries" in out
    assert (
        "folded: 'agent:main:telegram:direct:james' and 'agent:main:telegram:direct:James' are"
        " one key to the gateway ('agent:main:telegram:direct:james'):"
        " kept the newer entry, that of 'agent:main:telegram:direct:James'; the other stays"
        " in the backup"
    ) in out


def test_merge_into_existing_sessions_d_keeps_live_entries(state_dir: Path) -> None:
    sessions_dir = state_dir / "agents/main/sessions"
    original = (sessions_dir / "sessions.json").read_bytes()
    with SessionStore(sessions_dir / "sessions.d") as live:
        live.write("agent:main:main", b'{"sessionId": "live", "updatedAt": 1}')
        live.write("agent:main:only-live", b'{"sessionId": "only", "updatedAt": 1}')
    report = migrate_store(AgentStore(sessions_dir, "main"))
    assert report.outcome is Outcome.MIGRATED
    assert report.kept_live == ["agent:main:main"]
    assert report.migrated == 40
    live_now = live_entries(sessions_dir)
    assert live_now["agent:main:main"] == {"sessionId": "live", "updatedAt": 1}
    assert live_now["agent:main:only-live"] == {"sessionId": "only", "updatedAt": 1}
    assert len(live_now) == 42
    assert backups(sessions_dir)[0].read_bytes() == original
    assert not (sessions_dir / "sessions.d.migrating").exists()


def test_leftover_staging_dir_is_replaced(state_dir: Path) -> None:
    sessions_dir = state_dir / "agents/work/sessions"
    original = (sessions_dir / "sessions.json").read_bytes()
    stale = sessions_dir / "sessions.d.migrating"
    stale.mkdir()
    (stale / "stale%3Akey.json").write_text('{"sessionId": "stale", "updatedAt": 1}')
    (stale / "agent%3Awork%3Amain.json").write_text('{"sessionId": "half')
    assert migrate_store(AgentStore(sessions_dir, "work")).outcome is Outcome.MIGRATED
    assert_migrated(sessions_dir, original)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"  \n", "empty"), (b'{"a": ', "not valid JSON"), (b"[1]", "not an object")],
)
def test_unusable_sessions_json_is_left_alone(
    state_dir: Path, content: bytes, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = state_dir / "agents/work/sessions/sessions.json"
    bad.write_bytes(content)
    assert cli(["migrate", str(state_dir)]) == 1
    out = capsys.readouterr().out
    assert "work: failed: sessions.json" in out
    assert reason in out
    assert bad.read_bytes() == content
    assert not (state_dir / "agents/work/sessions/sessions.d").exists()
    assert not backups(state_dir / "agents/work/sessions")
    # the other agent migrated regardless
    assert "main: migrated 41 entries" in out
    assert (state_dir / "agents/main/sessions/sessions.d").is_dir()


def test_symlinked_agent_and_sessions_dirs_are_not_followed(
    tmp_path: Path, state_dir: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    write_legacy_store(elsewhere / "sessions", "ext", 5)
    os.symlink(elsewhere, state_dir / "agents/ext")
    (state_dir / "agents/linked").mkdir()
    os.symlink(elsewhere / "sessions", state_dir / "agents/linked/sessions")
    before = snapshot(elsewhere)
    reports = migrate_source(sources.resolve(state_dir), progress=None)
    outcome = {r.label: (r.outcome, r.reason) for r in reports}
    assert outcome["ext"] == (Outcome.SKIPPED, "agent dir is a symlink; not followed")
    assert outcome["linked"] == (Outcome.SKIPPED, "sessions dir is a symlink; not followed")
    assert outcome["main"][0] is Outcome.MIGRATED
    assert snapshot(elsewhere) == before
    assert cli(["migrate", str(state_dir)]) == 1  # not every agent ended migrated


def test_unmigratable_entries_stay_in_the_backup(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    sessions_dir.mkdir()
    legacy = {"ok": entry(), "long:" + "é" * 200: entry(), "null": None, "list": [1]}
    original = orjson.dumps(legacy, option=orjson.OPT_INDENT_2)
    (sessions_dir / "sessions.json").write_bytes(original)
    report = migrate_store(AgentStore(sessions_dir))
    assert report.outcome is Outcome.MIGRATED
    assert live_entries(sessions_dir) == {"ok": entry()}
    assert {k for k, _ in report.skipped} == {"long:" + "é" * 200, "null", "list"}
    assert backups(sessions_dir)[0].read_bytes() == original


def test_source_kinds(tmp_path: Path) -> None:
    for kind in ("dir", "file"):
        sessions_dir = tmp_path / kind / "sessions"
        write_legacy_store(sessions_dir, "a", 10)
        target = sessions_dir if kind == "dir" else sessions_dir / "sessions.json"
        assert cli(["migrate", str(target)]) == 0
        assert len(live_entries(sessions_dir)) >= 9


def test_default_source_is_openclaw_state_dir(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENCLAW_STATE_DIR", str(state_dir))
    assert cli(["migrate"]) == 0
    assert (state_dir / "agents/main/sessions/sessions.d").is_dir()


def test_missing_source_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["migrate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["migrate", str(tmp_path)]) == 2
    assert "holds no session store" in capsys.readouterr().err


def test_generated_store_with_thousands_of_entries(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "big", 3000, transcripts=False)
    original = (sessions_dir / "sessions.json").read_bytes()
    report = migrate_store(AgentStore(sessions_dir))
    assert report.outcome is Outcome.MIGRATED
    assert_migrated(sessions_dir, original)


# --- the OpenClaw store lock --------------------------------------------------

LOCK_HOLDER = """
import sys
from pathlib import Path
from sessionfs.locking import openclaw_store_lock
with openclaw_store_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _hold_store_lock(sessions_json: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(sessions_json)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_held_by_live_process_times_out_clearly(state_dir: Path) -> None:
    sessions_dir = state_dir / "agents/work/sessions"
    holder = _hold_store_lock(sessions_dir / "sessions.json")
    try:
        lock = orjson.loads((sessions_dir / "sessions.json.lock").read_bytes())
        assert lock["pid"] == holder.pid
        assert isinstance(lock["starttime"], int)
        assert lock["createdAt"].endswith("Z")
        report = migrate_store(AgentStore(sessions_dir, "work"), lock_timeout=0.6)
        assert report.outcome is Outcome.FAILED
        assert "timeout acquiring session store lock" in report.reason
        assert f"pid {holder.pid}" in report.reason
        assert (sessions_dir / "sessions.json").exists()
        assert not (sessions_dir / "sessions.d").exists()
    finally:
        holder.kill()
        holder.wait()


def test_lock_waits_for_a_live_holder(state_dir: Path) -> None:
    sessions_dir = state_dir / "agents/work/sessions"
    holder = _hold_store_lock(sessions_dir / "sessions.json")
    assert holder.stdin is not None
    holder.stdin.write("go\n")  # releases after reading the line, while we wait
    holder.stdin.flush()
    report = migrate_store(AgentStore(sessions_dir, "work"), lock_timeout=10)
    holder.wait()
    assert report.outcome is Outcome.MIGRATED
    assert not (sessions_dir / "sessions.json.lock").exists()


def test_lock_of_a_dead_process_is_taken_over(state_dir: Path) -> None:
    sessions_dir = state_dir / "agents/work/sessions"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (sessions_dir / "sessions.json.lock").write_bytes(
        orjson.dumps({"pid": dead.pid, "createdAt": "2026-11-24T00:00:00.000Z", "starttime": 1})
    )
    report = migrate_store(AgentStore(sessions_dir, "work"), lock_timeout=0.5)
    assert report.outcome is Outcome.MIGRATED
    assert not (sessions_dir / "sessions.json.lock").exists()


def test_old_or_recycled_locks_are_stale(tmp_path: Path) -> None:
    from sessionfs.locking import is_stale, process_starttime

    lock = tmp_path / "sessions.json.lock"
    me, start = os.getpid(), process_starttime(os.getpid())
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    cases = {
        "fresh": ({"pid": me, "createdAt": now, "starttime": start}, False),
        "old": ({"pid": me, "createdAt": "2020-01-01T00:00:00.000Z", "starttime": start}, True),
        "recycled": ({"pid": me, "createdAt": now, "starttime": (start or 0) + 1}, True),
        "bad date": ({"pid": me, "createdAt": "yesterday", "starttime": start}, True),
    }
    for name, (payload, stale) in cases.items():
        lock.write_bytes(orjson.dumps(payload))
        assert is_stale(lock) is stale, name


# --- crash safety -------------------------------------------------------------

STEPS = ["locked", "parsed", "staging-cleared", "staging-half", "staged", "live", "backed-up"]
MERGE_STEPS = ["staged", "merging", "merged", "staging-removed", "backed-up"]


def _run_migrate(sessions_dir: Path, crash_at: str | None = None) -> int:
    env = {**os.environ, "SESSIONFS_MIGRATE_CRASH_AT": crash_at or ""}
    return subprocess.run(
        [sys.executable, "-m", "sessionfs", "migrate", str(sessions_dir)],
        env=env,
        cwd=REPO,
        capture_output=True,
        check=False,
    ).returncode


def _assert_nothing_lost(sessions_dir: Path, original: bytes) -> None:
    """Any intermediate state: each planned entry is live, or the legacy file still holds it."""
    if (sessions_dir / "sessions.json").exists():
        assert (sessions_dir / "sessions.json").read_bytes() == original
        return
    assert_migrated(sessions_dir, original)


@pytest.mark.parametrize("merge", [False, True], ids=["fresh", "merge"])
def test_sigkill_at_every_step_then_rerun_completes(tmp_path: Path, merge: bool) -> None:
    for step in MERGE_STEPS if merge else STEPS:
        sessions_dir = tmp_path / step / "sessions"
        write_legacy_store(sessions_dir, "a", 40, transcripts=False)
        if merge:
            SessionStore(sessions_dir / "sessions.d").close()
        original = (sessions_dir / "sessions.json").read_bytes()
        assert _run_migrate(sessions_dir, crash_at=step) == -signal.SIGKILL, step
        _assert_nothing_lost(sessions_dir, original)
        assert _run_migrate(sessions_dir) == 0, step
        assert_migrated(sessions_dir, original)


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(42)
    landed_mid_way = 0
    write_legacy_store(tmp_path / "template", "a", 6000, transcripts=False)
    original = (tmp_path / "template" / "sessions.json").read_bytes()
    for round_ in range(6):
        sessions_dir = tmp_path / str(round_) / "sessions"
        sessions_dir.mkdir(parents=True)
        (sessions_dir / "sessions.json").write_bytes(original)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sessionfs", "migrate", str(sessions_dir)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # from the moment staging begins (however long the start-up took on a loaded
        # machine), a random moment within the migration
        deadline = time.monotonic() + 20
        while not (sessions_dir / "sessions.d.migrating").exists() and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (sessions_dir / "sessions.json").exists() and (
            (sessions_dir / "sessions.d.migrating").exists()
            or (sessions_dir / "sessions.d").exists()
        ):
            landed_mid_way += 1
        _assert_nothing_lost(sessions_dir, original)
        assert _run_migrate(sessions_dir) == 0
        assert_migrated(sessions_dir, original)
    assert landed_mid_way >= 2  # the kills really hit a migration in progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("on_terminal", [True, False])
def test_progress_line_only_on_a_terminal(
    tmp_path: Path, on_terminal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrate, "PROGRESS_MIN_ENTRIES", 100)
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 300, transcripts=False)
    stream = _Terminal() if on_terminal else io.StringIO()
    report = migrate_store(AgentStore(sessions_dir, "big"), progress=stream)
    out = stream.getvalue()
    assert (f"\rbig: {report.migrated}/{report.migrated} entries (" in out) is on_terminal
    assert (out == "") is not on_terminal


# -- leftovers and races ---------------------------------------------------------


@pytest.fixture
def at_step(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a callback when migration reaches a step (in this process)."""

    def arm(step: str, action: Any) -> None:
        monkeypatch.setitem(migrate.STEP_HOOKS, step, action)

    return arm


def test_enospc_while_staging_removes_the_copy_and_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 20, transcripts=False)
    original = (sessions_dir / "sessions.json").read_bytes()
    real_create = SessionStore.create_unlocked
    created: list[str] = []

    def disk_fills_up(self: SessionStore, key: str, data: bytes, **kwargs: Any) -> None:
        if len(created) == 5:
            raise OSError(28, "No space left on device")
        created.append(key)
        real_create(self, key, data, **kwargs)

    monkeypatch.setattr(SessionStore, "create_unlocked", disk_fills_up)
    report = migrate_store(AgentStore(sessions_dir))
    assert report.outcome is Outcome.FAILED
    assert f"could not write {sessions_dir / 'sessions.d.migrating'}/" in report.reason
    assert "No space left on device" in report.reason
    assert not (sessions_dir / "sessions.d.migrating").exists()
    assert (sessions_dir / "sessions.json").read_bytes() == original


def test_a_lock_left_by_a_killed_migration_is_removed_by_the_next_run(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 10, transcripts=False)
    assert _run_migrate(sessions_dir, crash_at="backed-up") == -signal.SIGKILL
    assert (sessions_dir / "sessions.json.lock").exists()
    report = migrate_store(AgentStore(sessions_dir))
    assert report.outcome is Outcome.NOTHING_TO_DO
    assert "removed a stale sessions.json.lock" in "\n".join(report.lines())
    assert not (sessions_dir / "sessions.json.lock").exists()


def test_a_lock_that_is_not_ours_is_never_removed(tmp_path: Path, at_step: Any) -> None:
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 10, transcripts=False)
    lock = sessions_dir / "sessions.json.lock"
    theirs = orjson.dumps({"pid": 1, "createdAt": "2099-01-01T00:00:00.000Z", "starttime": 1})
    # we were judged stale and the gateway took the lock over
    at_step("staged", lambda: lock.write_bytes(theirs))
    migrate_store(AgentStore(sessions_dir))
    assert lock.read_bytes() == theirs


def test_a_long_migration_keeps_its_lock_fresh(
    tmp_path: Path, at_step: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sessionfs import locking

    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 10, transcripts=False)
    lock = sessions_dir / "sessions.json.lock"
    seen: list[object] = []

    def slow_step() -> None:
        seen.append(orjson.loads(lock.read_bytes())["createdAt"])
        time.sleep(0.3)
        seen.append(orjson.loads(lock.read_bytes())["createdAt"])

    at_step("staged", slow_step)
    real_lock = locking.openclaw_store_lock

    def fast_refresh(path: Path, **kwargs: Any) -> Any:
        return real_lock(path, refresh_every=0.05, **kwargs)

    monkeypatch.setattr(migrate, "openclaw_store_lock", fast_refresh)
    assert migrate_store(AgentStore(sessions_dir)).outcome is Outcome.MIGRATED
    assert seen[0] != seen[1]  # renewed while the migration ran
    assert not lock.exists()


def test_a_gateway_write_during_the_migration_is_carried_over(tmp_path: Path, at_step: Any) -> None:
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 10, transcripts=False)
    legacy = orjson.loads((sessions_dir / "sessions.json").read_bytes())
    key = next(iter(legacy))
    changed = {**legacy, key: {**legacy[key], "updatedAt": 9e12, "label": "late"}}

    def lockless_gateway_writes() -> None:
        temp = sessions_dir / "sessions.json.tmp"
        temp.write_bytes(orjson.dumps(changed, option=orjson.OPT_INDENT_2))
        os.replace(temp, sessions_dir / "sessions.json")

    at_step("live", lockless_gateway_writes)
    report = migrate_store(AgentStore(sessions_dir))
    assert report.carried_over == [normalize_key(key)]
    assert live_entries(sessions_dir)[normalize_key(key)]["label"] == "late"


def test_a_gateway_write_is_live_before_the_backup_rename(tmp_path: Path, at_step: Any) -> None:
    """A crash right after the rename to the backup must not leave it only in the backup."""
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 10, transcripts=False)
    legacy = orjson.loads((sessions_dir / "sessions.json").read_bytes())
    late = {**legacy, "cron:late": {"sessionId": "late", "updatedAt": 9e12}}

    def lockless_gateway_writes() -> None:
        (sessions_dir / "sessions.json").write_bytes(orjson.dumps(late))

    def live_before_the_rename() -> None:
        assert "cron:late" in live_entries(sessions_dir)
        assert (sessions_dir / "sessions.json").exists()

    at_step("live", lockless_gateway_writes)
    at_step("carried", live_before_the_rename)
    report = migrate_store(AgentStore(sessions_dir))
    assert report.carried_over == ["cron:late"]


def test_a_sessions_d_created_meanwhile_is_merged_into_never_replaced(
    tmp_path: Path, at_step: Any
) -> None:
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 10, transcripts=False)
    planned = plan(orjson.loads((sessions_dir / "sessions.json").read_bytes())).entries

    def someone_creates_it() -> None:
        with SessionStore(sessions_dir / "sessions.d") as store:
            store.write("cron:meanwhile", orjson.dumps(entry("meanwhile")))

    at_step("staged", someone_creates_it)
    report = migrate_store(AgentStore(sessions_dir))
    assert report.outcome is Outcome.MIGRATED
    assert "cron:meanwhile" in live_entries(sessions_dir)
    assert report.migrated == len(planned)


def test_rerun_after_a_crash_between_go_live_and_backup_says_so(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    write_legacy_store(sessions_dir, "a", 10, transcripts=False)
    assert _run_migrate(sessions_dir, crash_at="live") == -signal.SIGKILL
    report = migrate_store(AgentStore(sessions_dir))
    lines = "\n".join(report.lines())
    assert "completed an interrupted migration" in lines
    assert "kept:" not in lines


def test_migrated_files_take_their_sessions_activity_as_mtime(state_dir: Path) -> None:
    """`ls -lt` sorts the migrated sessions newest first: each file's mtime is its entry's
    updatedAt, where that is a plausible epoch-ms time."""
    migrate_source(sources.resolve(state_dir), progress=None)
    entries = state_dir / "agents/main/sessions/sessions.d"
    checked = 0
    for path in entries.glob("*.json"):
        entry = orjson.loads(path.read_bytes())
        expected = entry_rules.activity_ns(entry)
        if expected is not None:
            assert path.stat().st_mtime_ns == expected, path.name
            checked += 1
        else:
            assert abs(path.stat().st_mtime - time.time()) < 600  # left as written
    assert checked
