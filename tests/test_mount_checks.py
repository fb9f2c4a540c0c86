"""`sessionfs mount` changes nothing before it knows the mount can work."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import orjson
import pyfuse3
import pytest

from sessionfs import daemon, sources
from sessionfs.cli import main as cli
from tests.helpers import entry
from tests.mounting import REPO, SESSIONFS

NOBODY = 65534  # the kernel's overflow id: Debian's user and group nobody


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    sessions_dir = tmp_path / "sessions"
    sessions_dir.mkdir()
    store = {"agent:main:main": entry("s-main")}
    (sessions_dir / "sessions.json").write_bytes(orjson.dumps(store, option=orjson.OPT_INDENT_2))
    (tmp_path / "mnt").mkdir()
    return sessions_dir


def untouched(sessions_dir: Path) -> bool:
    return sorted(p.name for p in sessions_dir.iterdir()) == ["sessions.json"]


def test_no_fuse_device_refuses_before_migrating(
    legacy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(daemon, "FUSE_DEVICE", str(tmp_path / "no-fuse"))
    assert cli(["mount", str(legacy), str(tmp_path / "mnt")]) == 1
    assert "does not exist: load the FUSE module" in capsys.readouterr().err
    assert untouched(legacy)


def test_an_unopenable_fuse_device_says_how_to_fix_it(
    legacy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def denied(path: str, flags: int, *args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(daemon, "FUSE_DEVICE", "/dev/fuse")
    real_open = os.open
    monkeypatch.setattr(
        os,
        "open",
        lambda path, flags, *a, **k: (
            denied(path, flags) if path == "/dev/fuse" else real_open(path, flags, *a, **k)
        ),
    )
    assert cli(["mount", str(legacy), str(tmp_path / "mnt")]) == 1
    assert "sudo chmod 0666 /dev/fuse" in capsys.readouterr().err
    assert untouched(legacy)


def test_no_fusermount3_refuses_before_migrating(
    legacy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert cli(["mount", str(legacy), str(tmp_path / "mnt")]) == 1
    assert "fusermount3 is missing" in capsys.readouterr().err
    assert untouched(legacy)


def test_a_mount_failing_after_migrating_tells_how_to_undo_it(
    legacy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def cannot_mount(*args: object) -> None:
        raise RuntimeError("fuse_session_mount failed")

    monkeypatch.setattr(pyfuse3, "init", cannot_mount)
    assert cli(["mount", "-f", str(legacy), str(tmp_path / "mnt")]) == 1
    err = capsys.readouterr().err
    assert f"sessionfs migrate --revert {legacy}" in err
    assert (legacy / "sessions.d").is_dir()  # migrated, and the way back was printed


def test_a_mountpoint_that_is_not_empty_is_refused_before_migrating(
    legacy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mnt" / "notes.txt").write_text("mine\n")
    assert cli(["mount", str(legacy), str(tmp_path / "mnt")]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert untouched(legacy)


def test_allow_other_without_user_allow_other_says_how_to_fix_it(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as a user, not root
    config = daemon.MountConfig(
        source=sources.resolve(legacy), mountpoint=tmp_path / "mnt", allow_other=True
    )
    with pytest.raises(daemon.MountError, match="needs user_allow_other"):
        daemon.check_allow_other(config, conf)
    conf.write_text("user_allow_other\n")
    daemon.check_allow_other(config, conf)  # and with it, nothing to say


def test_setup_system_puts_sessionfs_on_the_path(tmp_path: Path) -> None:
    """``scripts/setup --system`` links the command where mount.fuse3 and systemd look
    (``/usr/local/bin``; here a directory of the test's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    result = subprocess.run(
        [str(REPO / "scripts" / "setup"), "--system"],
        env={**os.environ, "SESSIONFS_BIN_DIR": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    linked = bin_dir / "sessionfs"
    assert linked.resolve() == (REPO / ".venv" / "bin" / "sessionfs").resolve()
    shown = subprocess.run(
        [str(linked), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert shown.returncode == 0
    assert "mount" in shown.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_user_without_access_to_the_fuse_device_is_told_the_fix() -> None:
    """The real CLI, run as `nobody` (setpriv) where /dev/fuse is root's only.

    In a private mount namespace a 0600 node of the same device covers /dev/fuse, as
    on machines that keep FUSE to root; this machine's own node is left as it is.
    `nobody` keeps CAP_DAC_READ_SEARCH and nothing else, so the interpreter (perhaps
    under /root) stays readable while opening the device for writing is refused.
    """
    home = Path(tempfile.mkdtemp(prefix="sessionfs-nobody-"))
    try:
        sessions_dir = home / "state" / "agents" / "main" / "sessions"
        sessions_dir.mkdir(parents=True)
        store = {"agent:main:main": entry("s-main")}
        (sessions_dir / "sessions.json").write_bytes(orjson.dumps(store))
        (home / "mnt").mkdir()
        for path in (home, *home.rglob("*")):
            os.chown(path, NOBODY, NOBODY)
        root_only_node = home / "fuse"
        os.mknod(root_only_node, stat.S_IFCHR | 0o600, os.stat("/dev/fuse").st_rdev)
        as_nobody = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=-all,+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "env",
            f"HOME={home}",
        ]
        result = subprocess.run(
            [
                *("unshare", "--mount", "sh", "-c", 'mount --bind "$0" /dev/fuse && exec "$@"'),
                str(root_only_node),
                *as_nobody,
                *SESSIONFS,
                *("mount", str(home / "state"), str(home / "mnt")),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == (
            "sessionfs: no permission to open /dev/fuse: run `sudo chmod 0666 /dev/fuse` "
            "or add yourself to the group that owns it"
        )
        assert untouched(sessions_dir)
    finally:
        shutil.rmtree(home)


def test_a_log_that_cannot_be_written_refuses_before_migrating(
    legacy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["mount", str(legacy), str(tmp_path / "mnt"), "--log", "/proc/no.log"]) == 1
    err = capsys.readouterr().err
    assert "cannot write the daemon's log /proc/no.log" in err
    assert "Traceback" not in err
    assert untouched(legacy)


def test_a_mountpoint_inside_its_own_store_is_refused(
    legacy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon would list and watch its own mount: its requests to itself hang."""
    inside = legacy / "view"
    inside.mkdir()
    assert cli(["mount", str(legacy), str(inside)]) == 1
    assert "lies inside the store it would show" in capsys.readouterr().err
    assert not (legacy / "sessions.d").exists()
    state = tmp_path / "state"
    (state / "agents" / "loop" / "sessions").mkdir(parents=True)
    legacy.rename(state / "agents" / "main")
    assert cli(["mount", str(state), str(state / "agents" / "loop" / "sessions")]) == 1
    assert "lies inside the store it would show" in capsys.readouterr().err


def test_a_symlinked_mountpoint_and_an_impossible_uid_are_refused(
    legacy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "mnt")
    assert cli(["mount", str(legacy), str(tmp_path / "link")]) == 1
    assert "is a symlink" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli(["mount", str(legacy), str(tmp_path / "mnt"), "-o", "uid=9999999999"])
    assert exited.value.code == 2
    assert "expected uid=N (0 to 4294967294)" in capsys.readouterr().err
    assert untouched(legacy)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_store_this_user_cannot_read_is_one_line_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = Path(tempfile.mkdtemp(prefix="sessionfs-private-"))  # 0700, root's
    try:
        state = private / "state"
        sessions_dir = state / "agents" / "main" / "sessions"
        sessions_dir.mkdir(parents=True)
        (sessions_dir / "sessions.json").write_bytes(orjson.dumps({"k": entry("s")}))
        readable = Path(tempfile.mkdtemp(prefix="sessionfs-readable-"))
        shutil.copytree(state, readable / "state")
        entries = readable / "state" / "agents" / "main" / "sessions" / "sessions.d"
        entries.mkdir(mode=0o700)  # root's: its listing is refused to nobody
        readable.chmod(0o755)
        for path in (readable / "state", *(readable / "state").rglob("*")):
            if path != entries:
                path.chmod(0o755 if path.is_dir() else 0o644)
        os.seteuid(NOBODY)
        try:
            codes = {command: cli([command, str(private / "state")]) for command in ("ls", "fsck")}
            err = capsys.readouterr().err
            assert codes == {"ls": 2, "fsck": 2}  # the SOURCE itself: a usage error
            assert f"{private / 'state'}: permission denied" in err
            codes = {
                command: cli([command, str(readable / "state")])
                for command in ("ls", "fsck", "export")
            }
            err = capsys.readouterr().err
            assert codes == {"ls": 1, "fsck": 3, "export": 1}
            assert "Permission denied" in err
        finally:
            os.seteuid(0)
        assert "Traceback" not in err
    finally:
        shutil.rmtree(private)
        shutil.rmtree(readable)


def test_a_daemon_that_never_serves_cannot_hang_mount(
    legacy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def stuck(*args: object, **kwargs: object) -> int:
        time.sleep(3600)  # (in the forked daemon)
        return 0

    monkeypatch.setattr(daemon, "serve", stuck)
    monkeypatch.setattr(daemon, "READY_TIMEOUT", 1.0)
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    assert (
        cli(["mount", "--no-migrate", "--log", str(log), str(legacy), str(tmp_path / "mnt")]) == 1
    )
    assert time.monotonic() - started < 30
    assert f"did not report the mount ready within 1 s and was stopped; see {log}" in (
        capsys.readouterr().err
    )


def test_status_of_a_daemon_from_an_older_sessionfs_still_prints(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon keeps its code when sessionfs is upgraded under it: its stats lack the
    counts the table takes from them, which it then leaves blank."""
    from sessionfs.mounts import FS_TYPE, MountEntry

    controls = {
        "source": f"{state_dir}\n",
        "pid": "4242\n",
        "errors": "",
        "stats": '{"requests": {"lookup": 1}, "rejected_writes": 0, "inodes": 3}',
        "fsck": "no background check has finished yet\n",
    }
    mnt = tmp_path / "mnt"
    monkeypatch.setattr(
        daemon, "find_mount", lambda path: MountEntry(str(mnt), FS_TYPE, "sessionfs")
    )

    def read_control(path: Path, name: str, *args: object) -> str:
        if name not in controls:
            raise FileNotFoundError(2, "No such file or directory")
        return controls[name]

    from sessionfs import mounts

    monkeypatch.setattr(daemon, "read_control", read_control)
    monkeypatch.setattr(mounts, "read_control", read_control)
    lines = daemon.status(mnt).splitlines()
    assert lines[0].endswith("(daemon pid 4242, log unknown)")  # it had no log file to name
    assert lines[1].split() == [
        "AGENT",
        "ERA",
        "ACCESS",
        "SESSIONS",
        "REJECTED",
        "BACKGROUND",
        "CHECK",
    ]
    assert lines[2].split()[-2:] == ["-", "-"]


def test_paths_are_read_as_the_kernel_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link before ``..`` is followed first (``sub/../x`` is not ``x`` when sub is a
    link); the last component is never resolved (it may be a hung mount)."""
    from sessionfs.mounts import absolute

    (tmp_path / "other" / "deep" / "dir").mkdir(parents=True)
    (tmp_path / "sub").symlink_to(tmp_path / "other" / "deep" / "dir")
    (tmp_path / "last").symlink_to(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    assert absolute(Path("sub/../mnt")) == tmp_path / "other" / "deep" / "mnt"
    assert absolute(Path("last")) == tmp_path / "last"
    assert absolute(Path("sub/..")) == tmp_path / "other" / "deep"


def test_a_sessions_dir_is_a_sqlite_agents_only_where_an_agent_keeps_one(
    tmp_path: Path, legacy: Path
) -> None:
    from sessionfs.sources import SourceKind

    database = tmp_path / "box" / "agent" / "openclaw-agent.sqlite"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"")
    state = tmp_path / "box" / "sessions"  # a state dir that happens to be named so
    (state / "agents").mkdir(parents=True)
    legacy.rename(state / "agents" / "main")
    assert sources.resolve(state).kind is SourceKind.STATE_DIR
    agent_db = tmp_path / "s" / "agents" / "a" / "agent" / "openclaw-agent.sqlite"
    agent_db.parent.mkdir(parents=True)
    agent_db.write_bytes(b"")
    sessions_dir = tmp_path / "s" / "agents" / "a" / "sessions"  # not made: its database is
    assert sources.resolve(sessions_dir).kind is SourceKind.SESSIONS_DIR


def test_a_mistyped_command_is_named_not_mounted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["stauts", "somewhere"])
    assert exited.value.code == 2
    assert "invalid choice: 'stauts'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path",
    ["/tmp/plain", "/tmp/a b", "/tmp/it's", "/tmp/$HOME`x`", "/tmp/new\nline", "/tmp/\udcff\udcfe"],
)
def test_paths_in_printed_commands_paste_as_themselves(path: str) -> None:
    """What `sessionfs umount X`, `migrate --revert X` and `fsck X` advice prints."""
    from sessionfs.shell import quote

    echoed = subprocess.run(
        ["bash", "-c", f"printf %s {quote(path)}"], capture_output=True, check=True
    )
    assert echoed.stdout == os.fsencode(path)
    assert quote(path).isprintable()
