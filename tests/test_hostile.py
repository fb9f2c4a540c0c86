"""Hostile files and failing parts: nothing stalls, nothing crashes, every report is readable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
import trio

from sessionfs import entry as entry_rules
from sessionfs import maintain as maintain_module
from sessionfs import sources
from sessionfs.daemon import MountConfig, _maintain_periodically, is_mounted
from sessionfs.errors import InvalidEntry
from sessionfs.maintain import Mode, Policy, maintain_source
from sessionfs.migrate import migrate_source
from sessionfs.store import SessionStore
from tests.helpers import entry_bytes, peak_rss_kib, raises_errno
from tests.mounting import REPO, SESSIONFS, mounted, sessionfs, wait_for

MAIN = "agent%3Amain%3Amain.json"
CUT_EMOJI = b'{"agent:main:main": {"sessionId": "s1", "updatedAt": 1, "label": "hi \\ud83d"}}'


def test_lone_surrogates_are_carried_over_without_loss(tmp_path: Path) -> None:
    """Node writes a string cut inside an emoji as a lone surrogate escape."""
    sessions = tmp_path / "agents" / "main" / "sessions"
    sessions.mkdir(parents=True)
    (sessions / "sessions.json").write_bytes(CUT_EMOJI)
    (report,) = migrate_source(sources.resolve(tmp_path), progress=None)
    assert report.outcome.ok, report.lines()
    stored = (sessions / "sessions.d" / "agent%3Amain%3Amain.json").read_bytes()
    assert b'"label": "hi \\ud83d"' in stored  # written as Node writes it
    assert entry_rules.loads(stored)["label"] == "hi \ud83d"
    with SessionStore(sessions / "sessions.d") as store:  # and it round-trips as a valid entry
        store.write("agent:main:other", stored)


def test_a_file_over_the_cap_is_refused_never_read_whole(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "sessions.d", max_entry_bytes=1 << 20) as store:
        huge = store.path / "cron%3Ahuge.json"
        with open(huge, "wb") as f:
            f.truncate(1 << 40)  # sparse: 1 TiB that a whole read would try to allocate
        started = time.monotonic()
        with pytest.raises(InvalidEntry) as raised:
            store.read("cron:huge")
        assert raised.value.errno == errno.EFBIG
        assert time.monotonic() - started < 1
        assert "over the 1048576-byte cap" in str(raised.value)


def test_maintenance_reports_what_it_cannot_read_and_odd_backup_names(tmp_path: Path) -> None:
    sessions = tmp_path / "state" / "agents" / "main" / "sessions"
    sessions.mkdir(parents=True)
    with SessionStore(sessions / "sessions.d") as store:
        store.write("cron:ok", entry_bytes("ok"))
    with open(sessions / "sessions.d" / "cron%3Ahuge.json", "wb") as f:
        f.truncate(64 << 20)
    (sessions / "sessions.json.bak.²").write_bytes(b"{}")  # "²".isdigit() is true
    (sessions / "sessions.json.bak.123abc").write_bytes(b"{}")
    policy = Policy(max_disk_bytes=1000)
    (result,) = maintain_source(sources.resolve(tmp_path / "state"), policy, Mode.WARN)
    assert result.error is None
    assert any("not read 'cron:huge'" in line for line in result.lines())


def test_commands_never_print_a_traceback_for_non_utf8_names(tmp_path: Path) -> None:
    sessions = tmp_path / "state" / "agents" / "main" / "sessions"
    (sessions / "sessions.d").mkdir(parents=True)
    (sessions / "sessions.d" / os.fsdecode(b"\xff\xfe.json")).write_bytes(entry_bytes())
    (sessions / os.fsdecode(b"sessions.json.bak.\xff")).write_bytes(b"{}")
    for command in (["ls"], ["maintain", "--max-disk-bytes", "10"], ["migrate"]):
        result = subprocess.run(
            [sys.executable, "-m", "sessionfs", *command, str(tmp_path / "state")],
            capture_output=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        out = result.stdout + result.stderr
        assert b"Traceback" not in out, (command, out)
        assert b"Logging error" not in out, (command, out)


@pytest.mark.fuse
def test_daemon_logs_non_utf8_names_escaped(tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    with SessionStore(sessions / "sessions.d") as store:
        store.write("cron:ok", entry_bytes("ok"))
    (sessions / "sessions.d" / os.fsdecode(b"bad-\xff.json")).write_bytes(entry_bytes())
    (tmp_path / "mnt").mkdir()
    log = tmp_path / "daemon.log"
    result = sessionfs("mount", str(sessions), str(tmp_path / "mnt"), "--log", str(log))
    assert result.returncode == 0, result.stderr
    try:
        assert os.listdir(tmp_path / "mnt") == [".sessionfs", "cron:ok.json"]
    finally:
        assert sessionfs("umount", str(tmp_path / "mnt")).returncode == 0
    text = log.read_text()
    assert "Logging error" not in text
    assert "Traceback" not in text
    assert "bad-\\udcff.json" in text  # named, escaped


@pytest.mark.fuse
def test_an_entry_over_the_cap_is_efbig_in_the_mount(tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    with SessionStore(sessions / "sessions.d") as store:
        store.write("cron:ok", entry_bytes("ok"))
    with open(sessions / "sessions.d" / "cron%3Ahuge.json", "wb") as f:
        f.truncate(300 << 20)
    with mounted(sessions, tmp_path / "mnt") as mount:
        with raises_errno(errno.EFBIG):
            (mount.path / "cron:huge.json").read_bytes()
        assert (mount.path / "cron:ok.json").read_bytes() == entry_bytes("ok")
        status = Path(f"/proc/{mount.pid}/status").read_text()
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if "VmHWM" in line))
        assert rss_kb < 200 * 1024  # the 300 MB file was never read
        assert "over the 16777216-byte cap" in mount.log_text()


def test_entry_loads_refuses_what_json_refuses() -> None:
    for bad in (b'{"a": NaN}', b'{"a": Infinity}', b'{"a": "\\ud83d"', b"\xff"):
        with pytest.raises(orjson.JSONDecodeError):
            entry_rules.loads(bad)


HOLD_LOCK = """
import sys
from sessionfs.store import SessionStore
with SessionStore(sys.argv[1]).locks.hold(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()
"""


class LockHolder:
    """Another process holding one key's lock (a gateway stopped in a debugger)."""

    def __init__(self, store_dir: Path, key: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(store_dir), key],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _write_through(path: Path, data: bytes, errors: list[int]) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        errors.append(exc.errno or 0)


def _start_writers(path: Path, count: int, errors: list[int]) -> list[threading.Thread]:
    """*count* writers of *path* through the mount, each collecting its errno in *errors*."""
    writers = [
        threading.Thread(target=_write_through, args=(path, entry_bytes(f"w{i}"), errors))
        for i in range(count)
    ]
    for thread in writers:
        thread.start()
    return writers


@pytest.mark.fuse
def test_one_stuck_key_never_stalls_the_others(state_dir: Path, tmp_path: Path) -> None:
    store_dir = state_dir / "agents/main/sessions/sessions.d"
    with mounted(state_dir, tmp_path / "mnt", "-o", "lock_timeout=4") as mount:
        agent = mount.path / "main"
        (agent / "agent:main:main.json").read_bytes()
        holder = LockHolder(store_dir, "agent:main:main")
        try:
            errors: list[int] = []
            stuck = _start_writers(agent / "agent:main:main.json", 200, errors)
            time.sleep(0.5)  # all 200 are waiting for the key now
            started = time.monotonic()
            for i in range(5):
                (agent / f"cron:other{i}.json").write_bytes(entry_bytes(f"other{i}"))
                assert (agent / f"cron:other{i}.json").read_bytes() == entry_bytes(f"other{i}")
            assert time.monotonic() - started < 1  # other sessions are not held up at all
            for thread in stuck:
                thread.join(30)
            assert len(errors) == 200
            assert set(errors) == {errno.EBUSY}
        finally:
            holder.release()
        (agent / "agent:main:main.json").write_bytes(entry_bytes("after"))
        assert (store_dir / "agent%3Amain%3Amain.json").read_bytes() == entry_bytes("after")
        log = mount.log_text()
        assert "session main/agent:main:main is locked by another process; gave up" in log
        assert log.count("WARNING session main/agent:main:main is locked by another") == 1


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["SIGTERM", "umount --lazy"])
def test_unmounts_while_writers_wait_for_a_stuck_key(
    state_dir: Path, tmp_path: Path, how: str
) -> None:
    store_dir = state_dir / "agents/main/sessions/sessions.d"
    with mounted(state_dir, tmp_path / "mnt", clean_exit=False) as mount:
        agent = mount.path / "main"
        holder = LockHolder(store_dir, "agent:main:main")
        try:
            errors: list[int] = []
            stuck = _start_writers(agent / "agent:main:main.json", 20, errors)
            time.sleep(0.5)
            if how == "SIGTERM":
                assert mount.stop(signal.SIGTERM) == 0
            else:
                result = sessionfs("umount", "--lazy", str(mount.path))
                assert result.returncode == 0, result.stderr
                assert mount.proc.wait(timeout=30) == 0
            for thread in stuck:
                thread.join(30)
                assert not thread.is_alive()
            assert not is_mounted(mount.path)
        finally:
            holder.release()


@pytest.mark.fuse
def test_a_failing_watcher_degrades_and_recovers_never_unmounts(
    state_dir: Path, tmp_path: Path
) -> None:
    agents, away = state_dir / "agents", state_dir / "agents.away"
    with mounted(state_dir, tmp_path / "mnt") as mount:
        session = mount.path / "main" / "agent:main:main.json"
        session.read_bytes()
        agents.rename(away)
        agents.write_text("not a directory")  # the watcher's look at the agents fails
        wait_for(lambda: "cannot follow changes" in mount.log_text(), what="the warning")
        assert is_mounted(mount.path)
        assert mount.proc.poll() is None
        agents.unlink()
        away.rename(agents)
        wait_for(lambda: "following changes behind the mount again" in mount.log_text())
        assert session.read_bytes() == (agents / "main/sessions/sessions.d" / MAIN).read_bytes()
        with SessionStore(agents / "main/sessions/sessions.d") as store:
            store.write("agent:main:main", entry_bytes("behind"))
        wait_for(lambda: session.read_bytes() == entry_bytes("behind"), timeout=1)
        log = mount.log_text()
        assert log.count("cannot follow changes") == 1  # once, not once per retry


@pytest.mark.expected_log("internal error in maintenance")
async def test_failing_background_maintenance_is_logged_and_retried(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [OSError(errno.EACCES, "Permission denied", "agents/main"), RuntimeError("gremlin")]
    runs: list[int] = []

    def flaky(*args: object, **kwargs: object) -> list[object]:
        runs.append(1)
        if failures:
            raise failures.pop(0)
        return []

    monkeypatch.setattr(maintain_module, "maintain_source", flaky)
    stopping = SimpleNamespace(stopping=threading.Event())  # what it reads of the mount
    config = MountConfig(sources.resolve(state_dir), state_dir / "mnt", maintain_every=0.01)
    with trio.move_on_after(1):
        while len(runs) < 3:
            with trio.move_on_after(0.05):
                await _maintain_periodically(config, stopping)  # type: ignore[arg-type]
    assert len(runs) >= 3  # it went on after both failures
    assert "maintenance failed: agents/main: Permission denied; trying again" in caplog.text
    assert "internal error in maintenance; trying again at the next run" in caplog.text
    assert "RuntimeError: gremlin" in caplog.text


@pytest.mark.fuse
def test_keys_the_gateway_would_never_find_are_refused(state_dir: Path, tmp_path: Path) -> None:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        main, work = mount.path / "main", mount.path / "work"
        with raises_errno(errno.EINVAL):
            (main / "UPPER:Case.json").write_bytes(entry_bytes("upper"))
        archive = tmp_path / "main.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(main), "."], check=True)
        untar = subprocess.run(
            ["tar", "-xf", str(archive), "-C", str(work)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert untar.returncode != 0  # every agent:main:* entry is refused in work's dir
        assert "agent\\:main\\:main.json: Cannot open: Invalid argument" in untar.stderr
        assert not [p.name for p in work.iterdir() if p.name.startswith("agent:main:")]
        (work / "cron:anywhere.json").write_bytes(entry_bytes("cron"))  # no agent part: fine
        # a key that exists already keeps working, whatever its spelling
        (main / "agent:main:main.json").write_bytes(entry_bytes("still"))
        errors = (mount.path / ".sessionfs" / "errors").read_text()
        assert "main/UPPER:Case.json" in errors
        assert "the gateway looks this key up as 'upper:case'" in errors
        assert "this key belongs to agent 'main', not to 'work'" in errors
        assert "the gateway looks this key up as 'upper:case'" in mount.log_text()
    with SessionStore(state_dir / "agents/work/sessions/sessions.d") as store:
        keys = list(store.keys())
    assert "cron:anywhere" in keys
    assert not [k for k in keys if k.startswith("agent:main:") or k != k.lower()]


def _read_everything(directory: Path) -> dict[str, bytes | int]:
    """What `cat *` through the mount gets for every name: bytes or an errno (never a hang)."""
    names = subprocess.run(
        ["ls", "-1", str(directory)], capture_output=True, timeout=20, check=True
    ).stdout.split(b"\n")
    got: dict[str, bytes | int] = {}
    for name in filter(None, names):
        try:
            with open(directory / os.fsdecode(name), "rb") as f:
                got[os.fsdecode(name)] = f.read(1 << 20)
        except OSError as exc:
            got[os.fsdecode(name)] = exc.errno or 0
    return got


@pytest.mark.fuse
def test_hostile_files_before_and_during_a_mount(state_dir: Path, tmp_path: Path) -> None:
    from tests.test_fsck import HOSTILE, plant_hostile_files

    migrate_source(sources.resolve(state_dir / "agents/main/sessions"), progress=None)
    entries = state_dir / "agents/main/sessions/sessions.d"
    plant_hostile_files(entries, big=300 * 1024 * 1024)  # a 300 MB entry (sparse)
    work = state_dir / "agents/work/sessions/sessions.json"
    work.unlink()
    work.symlink_to("/etc/passwd")  # a sessions.json that is a symlink: never followed
    with mounted(state_dir, tmp_path / "mnt") as mount:
        before = _read_everything(mount.path / "main")
        assert before["agent:main:main.json"] == (entries / MAIN).read_bytes()
        assert before["cron:big.json"] == errno.EFBIG
        during = entries / "during"
        during.mkdir()
        plant_hostile_files(during, big=300 * 1024 * 1024)
        for path in during.iterdir():
            path.rename(entries / ("x" + path.name if path.name.startswith("c") else path.name))
        wait_for(  # the watcher shows files placed behind the mount within 100 ms
            lambda: "xcron:big.json" in os.listdir(mount.path / "main"), timeout=1
        )
        got = _read_everything(mount.path / "main")
        assert got["agent:main:main.json"] == (entries / MAIN).read_bytes()
        assert got["xcron:big.json"] == errno.EFBIG
        for name, content in got.items():
            # what is shown is an entry or refused; never the bytes of /etc/passwd
            assert isinstance(content, int) or b"root:" not in content, name
        assert "passwd" not in str(sorted(os.listdir(mount.path / "main")))
        assert not (mount.path / "work").exists()  # its sessions.json is not followed
        assert peak_rss_kib(mount.pid) < 250 * 1024  # a 300 MB entry was never read whole
        (mount.path / "main" / "cron:after.json").write_bytes(entry_bytes("after"))
        checked = subprocess.run(
            [*SESSIONFS, "fsck", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert checked.returncode == 1
        for name, problem in HOSTILE.items():
            assert any(name in line and problem in line for line in checked.stdout.splitlines())
        assert "sessions.json is a symlink; never followed" in checked.stdout
    log = mount.log_text()
    assert "Traceback" not in log


@pytest.mark.fuse
def test_scratch_files_honour_o_trunc(state_dir: Path, tmp_path: Path) -> None:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        agent = mount.path / "main"
        shell = subprocess.run(
            "printf 'a long first version' > notes.txt && printf 'b' > notes.txt && "
            "cat notes.txt && "
            "jq '.label = \"one\"' agent:main:main.json > f.tmp && "
            "mv f.tmp agent:main:main.json && "
            "jq '.label = \"two\"' agent:main:main.json > f.tmp && "
            "mv f.tmp agent:main:main.json",
            shell=True,
            cwd=agent,
            capture_output=True,
            text=True,
            check=False,
        )
        assert shell.returncode == 0, shell.stderr
        assert shell.stdout == "b"
        assert orjson.loads((agent / "agent:main:main.json").read_bytes())["label"] == "two"


@pytest.mark.fuse
def test_enforced_maintenance_on_a_stuck_key_never_holds_up_the_unmount(
    state_dir: Path, tmp_path: Path
) -> None:
    migrate_source(sources.resolve(state_dir), progress=None)
    store_dir = state_dir / "agents/main/sessions/sessions.d"
    holder = LockHolder(store_dir, "agent:main:slack:direct:ancient")
    try:
        with mounted(
            state_dir,
            tmp_path / "mnt",
            "--maintain-every",
            "1s",
            "--maintain-mode",
            "enforce",
            clean_exit=False,
        ) as mount:
            time.sleep(1.5)  # maintenance is waiting for the held key now
            started = time.monotonic()
            assert mount.stop(signal.SIGTERM) == 0
            assert time.monotonic() - started < 3
            assert not is_mounted(mount.path)
        assert (store_dir / "agent%3Amain%3Aslack%3Adirect%3Aancient.json").exists()
    finally:
        holder.release()
