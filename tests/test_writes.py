"""Writes through the mount with the real tools people use, checked against sessions.d/."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sessionfs.fsck import OWN_DOT_NAMES
from sessionfs.keys import filename_to_key
from sessionfs.store import SessionStore
from tests.helpers import entry, entry_bytes, raises_errno
from tests.mounting import REPO, Mount, mounted, sessionfs, wait_for

pytestmark = pytest.mark.fuse

KEY = "agent:main:main"
NAME = "agent:main:main.json"
BACKING = "agent%3Amain%3Amain.json"


@pytest.fixture
def mnt(state_dir: Path, tmp_path: Path) -> Iterator[Mount]:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        yield mount


@pytest.fixture
def agent(mnt: Mount) -> Path:
    return mnt.path / "main"


@pytest.fixture
def store_dir(state_dir: Path) -> Path:
    return state_dir / "agents/main/sessions/sessions.d"


def run(*args: str, cwd: Path, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=60, input=input, check=False
    )


def stored(store_dir: Path, name: str = BACKING) -> dict[str, object]:
    value = orjson.loads((store_dir / name).read_bytes())
    assert isinstance(value, dict)
    return value


def assert_store_clean(store_dir: Path) -> None:
    """Only whole entries under canonical names; no temps, no editor files."""
    for name in os.listdir(store_dir):
        if name in OWN_DOT_NAMES:  # the key locks, the migration's note of its backup
            continue
        assert filename_to_key(name) is not None, f"stray file {name!r} in sessions.d"
        assert isinstance(orjson.loads((store_dir / name).read_bytes()), dict), name


def test_cat_reads_entries(agent: Path, store_dir: Path) -> None:
    result = run("cat", NAME, cwd=agent)
    assert result.returncode == 0
    assert result.stdout.encode() == (store_dir / BACKING).read_bytes()


def test_jq_to_temp_then_mv(agent: Path, store_dir: Path) -> None:
    result = run(
        "sh", "-c", f"jq '.label=\"x\"' {NAME} > {NAME}.tmp && mv {NAME}.tmp {NAME}", cwd=agent
    )
    assert result.returncode == 0, result.stderr
    assert stored(store_dir)["label"] == "x"
    assert not (agent / f"{NAME}.tmp").exists()
    assert_store_clean(store_dir)


def test_sed_in_place(agent: Path, store_dir: Path) -> None:
    before = (store_dir / BACKING).read_bytes()
    result = run("sed", "-i", 's/"chatType": "direct"/"chatType": "group"/', NAME, cwd=agent)
    assert result.returncode == 0, result.stderr
    expected = before.replace(b'"chatType": "direct"', b'"chatType": "group"')
    assert expected != before
    assert (store_dir / BACKING).read_bytes() == expected
    assert [n for n in os.listdir(agent) if n.startswith("sed")] == []
    assert_store_clean(store_dir)


def test_cp_valid_and_invalid(agent: Path, store_dir: Path, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_bytes(entry_bytes("copied"))
    bad.write_text("not json")
    assert run("cp", str(good), NAME, cwd=agent).returncode == 0
    assert (store_dir / BACKING).read_bytes() == entry_bytes("copied")
    assert run("cp", str(good), "cron:new.json", cwd=agent).returncode == 0
    assert (store_dir / "cron%3Anew.json").read_bytes() == entry_bytes("copied")

    result = run("cp", str(bad), NAME, cwd=agent)
    assert result.returncode == 1
    assert "Invalid argument" in result.stderr
    assert (store_dir / BACKING).read_bytes() == entry_bytes("copied")  # the old entry stays
    result = run("cp", str(bad), "cron:other.json", cwd=agent)
    assert result.returncode == 1
    # a refused new file never existed (it goes at release, which close() does not wait for)
    wait_for(lambda: not (agent / "cron:other.json").exists(), what="the refused file to vanish")
    assert not (store_dir / "cron%3Aother.json").exists()
    assert_store_clean(store_dir)


def test_cp_preserve_and_metadata_calls_are_accepted(
    agent: Path, store_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src.json"
    src.write_bytes(entry_bytes("p"))
    os.chmod(src, 0o644)
    result = run("cp", "-p", str(src), NAME, cwd=agent)
    assert result.returncode == 0, result.stderr
    assert run("chmod", "644", NAME, cwd=agent).returncode == 0
    assert run("chown", f"{os.getuid()}:{os.getgid()}", NAME, cwd=agent).returncode == 0
    assert stat.S_IMODE((agent / NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((store_dir / BACKING).stat().st_mode) == 0o600


def test_copy_tools_copying_into_an_agent_directory_exit_0(
    agent: Path, store_dir: Path, tmp_path: Path
) -> None:
    """chmod, chown and touch of an agent directory are accepted and change nothing.

    `cp -a dir/. mount/main/` and `tar -x` of a copy set the directory's mode, owner and
    times after filling it; a refusal there made them exit 1 for copies that succeeded.
    """
    before = agent.stat()
    transcript = next(agent.glob("*.jsonl"))  # (read-only: its size never changes)
    transcript_before = transcript.stat()
    assert run("chmod", "755", ".", cwd=agent).returncode == 0
    assert run("chown", f"{os.getuid()}:{os.getgid()}", ".", cwd=agent).returncode == 0
    assert run("touch", "-d", "2020-01-01", ".", cwd=agent).returncode == 0
    for recursive in (["chmod", "-R", "u+rw"], ["chown", "-R", f"{os.getuid()}"]):
        result = run(*recursive, ".", cwd=agent)
        assert result.returncode == 0, result.stderr
    after = agent.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    assert transcript.stat().st_mtime_ns == transcript_before.st_mtime_ns
    assert (agent.parent / ".sessionfs" / "errors").read_text() == ""  # nothing was refused
    with raises_errno(errno.EROFS):
        os.truncate(transcript, 0)

    copy = tmp_path / "copy" / "main"
    copy.mkdir(parents=True)
    copy.chmod(0o755)
    (copy / "cron:copied.json").write_bytes(entry_bytes("copied"))
    result = run("cp", "-a", f"{copy}/.", f"{agent}/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert stored(store_dir, "cron%3Acopied.json")["sessionId"] == "copied"

    (copy / "cron:copied.json").write_bytes(entry_bytes("untarred"))
    assert (
        run("tar", "-cf", "copy.tar", "-C", str(copy.parent), "main", cwd=tmp_path).returncode == 0
    )
    result = run("tar", "-xf", str(tmp_path / "copy.tar"), cwd=agent.parent)
    assert result.returncode == 0, result.stderr
    assert stored(store_dir, "cron%3Acopied.json")["sessionId"] == "untarred"
    assert stat.S_IMODE(agent.stat().st_mode) == stat.S_IMODE(before.st_mode)


def test_mtime_changes_exactly_with_content(agent: Path, store_dir: Path) -> None:
    path = agent / NAME
    before = path.stat()
    assert run("touch", NAME, cwd=agent).returncode == 0
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    time.sleep(0.01)
    path.write_bytes(entry_bytes("changed"))
    after = path.stat()
    assert after.st_mtime_ns != before.st_mtime_ns
    assert after.st_mtime_ns == (store_dir / BACKING).stat().st_mtime_ns
    assert after.st_ino == before.st_ino  # stable across commits
    assert after.st_size == len(entry_bytes("changed"))


def test_mv_renames_keys(agent: Path, store_dir: Path) -> None:
    content = (store_dir / BACKING).read_bytes()
    result = run("mv", NAME, "agent:main:renamed.json", cwd=agent)
    assert result.returncode == 0, result.stderr
    assert not (store_dir / BACKING).exists()
    assert (store_dir / "agent%3Amain%3Arenamed.json").read_bytes() == content
    assert "agent:main:renamed.json" in os.listdir(agent)
    assert NAME not in os.listdir(agent)
    # -n never replaces (RENAME_NOREPLACE)
    other = (store_dir / "cron%3A128b2f33-0c5c-7fd0-a6a3-a4506513270e.json").read_bytes()
    run(
        "mv",
        "-n",
        "agent:main:renamed.json",
        "cron:128b2f33-0c5c-7fd0-a6a3-a4506513270e.json",
        cwd=agent,
    )
    assert (store_dir / "cron%3A128b2f33-0c5c-7fd0-a6a3-a4506513270e.json").read_bytes() == other
    assert (store_dir / "agent%3Amain%3Arenamed.json").read_bytes() == content
    assert_store_clean(store_dir)


def test_mv_from_another_filesystem(agent: Path, store_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "incoming.json"
    outside.write_bytes(entry_bytes("incoming"))
    result = run("mv", str(outside), NAME, cwd=agent)
    assert result.returncode == 0, result.stderr
    assert (store_dir / BACKING).read_bytes() == entry_bytes("incoming")
    assert not outside.exists()
    assert_store_clean(store_dir)


def test_rm(agent: Path, store_dir: Path) -> None:
    assert run("rm", NAME, cwd=agent).returncode == 0
    assert not (store_dir / BACKING).exists()
    assert NAME not in os.listdir(agent)
    assert not (agent / NAME).exists()


def test_rejected_redirect_is_visible(mnt: Mount, agent: Path, store_dir: Path) -> None:
    before = (store_dir / BACKING).read_bytes()
    result = run("bash", "-c", f"echo '{{' > {NAME}", cwd=agent)
    assert result.returncode == 0  # bash cannot tell: the error must show elsewhere
    assert (store_dir / BACKING).read_bytes() == before
    errors = (mnt.path / ".sessionfs" / "errors").read_text()
    assert f"main/{NAME}  EINVAL  not valid JSON" in errors
    status = sessionfs("status", str(mnt.path))
    assert status.returncode == 0
    assert f"main/{NAME}  EINVAL  not valid JSON" in status.stdout
    assert "rejected write to main/agent:main:main.json: not valid JSON" in mnt.log_text()
    assert ".sessionfs" not in os.listdir(agent)  # not among the sessions


def test_redirect_and_append(agent: Path, store_dir: Path) -> None:
    result = run(
        "bash",
        "-c",
        f"echo '{entry_bytes('r').decode()}' > {NAME} && printf '\\n' >> {NAME}",
        cwd=agent,
    )
    assert result.returncode == 0
    assert (store_dir / BACKING).read_bytes() == entry_bytes("r") + b"\n\n"


def test_truncate_to_zero_is_refused(agent: Path, store_dir: Path) -> None:
    before = (store_dir / BACKING).read_bytes()
    result = run("truncate", "-s0", NAME, cwd=agent)
    assert result.returncode == 1
    assert "Invalid argument" in result.stderr
    assert (store_dir / BACKING).read_bytes() == before
    with raises_errno(errno.EINVAL):
        os.truncate(agent / NAME, 10)  # path truncate: read, cut, validate
    assert (store_dir / BACKING).read_bytes() == before


def test_touch_new_file_then_write(agent: Path, store_dir: Path) -> None:
    assert run("touch", "cron:fresh.json", cwd=agent).returncode == 0
    assert (agent / "cron:fresh.json").stat().st_size == 0
    assert "cron:fresh.json" in os.listdir(agent)
    assert not (store_dir / "cron%3Afresh.json").exists()  # empty: not an entry yet
    (agent / "cron:fresh.json").write_bytes(entry_bytes("fresh"))
    assert (store_dir / "cron%3Afresh.json").read_bytes() == entry_bytes("fresh")
    assert_store_clean(store_dir)


def test_python_json_dump_in_place_and_via_replace(agent: Path, store_dir: Path) -> None:
    script = f"""
import json, os, tempfile
p = {NAME!r}
d = json.load(open(p))
d["label"] = "in-place"
with open(p, "w") as f:
    json.dump(d, f, indent=2)
assert json.load(open(p))["label"] == "in-place"
d["label"] = "replaced"
fd, tmp = tempfile.mkstemp(dir=".", prefix=".tmp-")
with os.fdopen(fd, "w") as f:
    json.dump(d, f)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, p)
"""
    result = run(sys.executable, "-c", script, cwd=agent)
    assert result.returncode == 0, result.stderr
    assert stored(store_dir)["label"] == "replaced"
    assert_store_clean(store_dir)


def test_node_write_file_sync(agent: Path, store_dir: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "scripts/setup --test-tools installs Node.js"
    script = f"""
const fs = require('fs');
const d = JSON.parse(fs.readFileSync({NAME!r}));
d.label = 'node';
fs.writeFileSync({NAME!r}, JSON.stringify(d, null, 2));
try {{ fs.writeFileSync({NAME!r}, '{{broken'); process.exit(3); }}
catch (e) {{ console.log(e.code); }}
"""
    result = run(node, "-e", script, cwd=agent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "EINVAL"
    assert stored(store_dir)["label"] == "node"


def vim_ex(agent: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    """vim in ex mode with no vimrc, the way a script drives it; backups made even under /tmp."""
    args = [arg for command in ("set backupskip=", *commands) for arg in ("-c", command)]
    return run("vim", "-u", "NONE", "-N", "-es", *args, NAME, cwd=agent)


@pytest.mark.parametrize("backupcopy", ["auto", "yes", "no"])
def test_vim_saves(agent: Path, store_dir: Path, backupcopy: str) -> None:
    before = (store_dir / BACKING).read_bytes()
    result = vim_ex(
        agent,
        f"set backupcopy={backupcopy}",
        "set writebackup",
        '%s/"chatType": "direct"/"chatType": "vim"/',
        "wq",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # vim adds the final newline OpenClaw does not write
    expected = before.replace(b'"chatType": "direct"', b'"chatType": "vim"') + b"\n"
    assert expected != before + b"\n"
    assert (store_dir / BACKING).read_bytes() == expected
    leftovers = [n for n in os.listdir(agent) if n.endswith(("~", ".swp")) or n == "4913"]
    assert leftovers == []
    assert_store_clean(store_dir)


def test_vim_refused_save_keeps_the_entry(agent: Path, store_dir: Path) -> None:
    before = (store_dir / BACKING).read_bytes()
    result = vim_ex(agent, "set backupcopy=no", "%d", "call setline(1, '{broken')", "w", "q!")
    assert result.returncode != 0
    assert (store_dir / BACKING).read_bytes() == before
    assert NAME in os.listdir(agent)
    assert_store_clean(store_dir)


def _drive(argv: list[str], cwd: Path, keys: list[bytes]) -> int:
    """Run a full-screen program on a pseudo-terminal and type *keys* into it."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.environ["TERM"] = "xterm"
        os.execvp(argv[0], argv)
    try:
        deadline = time.monotonic() + 30
        for key in [b"", *keys]:
            end = time.monotonic() + 0.4
            while time.monotonic() < end:  # let it draw, and drain what it prints
                if select.select([fd], [], [], 0.05)[0]:
                    try:
                        os.read(fd, 65536)
                    except OSError:
                        break
            os.write(fd, key)
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if select.select([fd], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):
                    os.read(fd, 65536)
        os.kill(pid, 9)
        pytest.fail(f"{argv[0]} did not exit")
    finally:
        os.close(fd)


def test_nano_saves(agent: Path, store_dir: Path) -> None:
    assert shutil.which("nano"), "scripts/setup --test-tools installs nano"
    before = (store_dir / BACKING).read_bytes()
    # type a space at the top (still valid JSON), write out (^O, Enter), exit (^X)
    code = _drive(["nano", "--ignorercfiles", NAME], agent, [b" ", b"\x0f", b"\r", b"\x18"])
    assert code == 0
    assert (store_dir / BACKING).read_bytes() == b" " + before + b"\n"  # nano ends lines too
    assert_store_clean(store_dir)


def _update(path: str, sid: str, count: int) -> None:
    for i in range(count):
        with open(path, "wb") as f:
            f.write(entry_bytes(sid, updated_at=i, pad=sid * 200))


def test_two_writers_on_one_key_and_on_two_keys(agent: Path, store_dir: Path) -> None:
    one = str(agent / NAME)
    writers = [threading.Thread(target=_update, args=(one, sid, 30)) for sid in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    final = (store_dir / BACKING).read_bytes()
    assert final in (entry_bytes(s, updated_at=29, pad=s * 200) for s in ("a", "b"))
    paths = {sid: str(agent / f"cron:{sid}.json") for sid in ("c", "d")}
    writers = [threading.Thread(target=_update, args=(p, sid, 30)) for sid, p in paths.items()]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    for sid in ("c", "d"):
        assert (store_dir / f"cron%3A{sid}.json").read_bytes() == entry_bytes(
            sid, updated_at=29, pad=sid * 200
        )
    assert_store_clean(store_dir)


HOLD_LOCK = """
import sys
from sessionfs.store import SessionStore
with SessionStore(sys.argv[1]).locks.hold(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_writer_of_one_session_never_waits_for_another(agent: Path, store_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store_dir), KEY],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        blocked = threading.Thread(target=(agent / NAME).write_bytes, args=(entry_bytes("waits"),))
        blocked.start()  # its commit waits for the lock, off the daemon's trio thread
        time.sleep(0.2)
        (agent / "cron:other.json").write_bytes(entry_bytes("other"))
        assert (agent / "cron:other.json").read_bytes() == entry_bytes("other")
        assert blocked.is_alive()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        blocked.join(20)
        assert (store_dir / BACKING).read_bytes() == entry_bytes("waits")
    finally:
        holder.kill()
        holder.wait()


def test_fsync_commits_before_close(agent: Path, store_dir: Path) -> None:
    fd = os.open(agent / NAME, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, entry_bytes("synced"))
        os.fsync(fd)
        assert (store_dir / BACKING).read_bytes() == entry_bytes("synced")
        os.pwrite(fd, b"S", len(b'{\n  "sessionId": "'))  # a write at an offset
    finally:
        os.close(fd)
    assert stored(store_dir)["sessionId"] == "Synced"


def test_unlinked_session_stays_readable_through_open_handle(agent: Path, store_dir: Path) -> None:
    before = (store_dir / BACKING).read_bytes()
    with open(agent / NAME, "rb", buffering=0) as f:
        f.read(5)
        os.unlink(agent / NAME)
        assert not (store_dir / BACKING).exists()
        f.seek(0)
        assert f.read() == before


def test_rename_to_backup_keeps_entry_until_removal(agent: Path, store_dir: Path) -> None:
    before = (store_dir / BACKING).read_bytes()
    os.rename(agent / NAME, agent / f"{NAME}.bak")
    assert NAME not in os.listdir(agent)
    assert (agent / f"{NAME}.bak").read_bytes() == before
    assert (store_dir / BACKING).read_bytes() == before  # not lost while it is only renamed
    os.rename(agent / f"{NAME}.bak", agent / NAME)  # and back: nothing changed
    assert (store_dir / BACKING).read_bytes() == before
    os.rename(agent / NAME, agent / f"{NAME}~")
    os.unlink(agent / f"{NAME}~")  # the user's intent was removal after all
    assert not (store_dir / BACKING).exists()
    assert_store_clean(store_dir)


def test_scratch_files_never_reach_the_store(agent: Path, store_dir: Path) -> None:
    names = [".x.swp", "4913", "sed0Ab12C", "x.tmp", "x~", "#x#", ".#x", "notes.txt"]
    for name in names:
        (agent / name).write_text("{not json at all")
    assert set(names) <= set(os.listdir(agent))
    assert (agent / "x.tmp").read_text() == "{not json at all"
    assert_store_clean(store_dir)
    for name in names:
        os.unlink(agent / name)
    assert not set(names) & set(os.listdir(agent))


def test_refused_operations(agent: Path, mnt: Mount) -> None:
    with raises_errno(errno.EPERM):
        os.mkdir(agent / "d")
    with raises_errno(errno.EPERM):
        os.symlink("/etc/passwd", agent / "l.json")
    with raises_errno(errno.EPERM):
        os.link(agent / NAME, agent / "hard.json")
    with raises_errno(errno.EPERM):
        os.mkfifo(agent / "fifo.json")
    with raises_errno(errno.ENAMETOOLONG):
        (agent / ("x" * 252 + ".json")).write_bytes(entry_bytes())
    with raises_errno(errno.ENAMETOOLONG):  # fits as a name, but not once ':' is escaped
        (agent / (":" * 84 + ".json")).write_bytes(entry_bytes())
    with raises_errno(errno.EINVAL):
        open(os.fsencode(agent) + b"/\xff.json", "wb").close()
    with raises_errno(errno.EINVAL):  # not the spelling of a key: no second file for "A"
        (agent / "%41.json").write_bytes(entry_bytes())
    with raises_errno(errno.EPERM):
        (mnt.path / "new.json").write_bytes(entry_bytes())  # the root holds agents, not sessions


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_rename_flags(agent: Path, store_dir: Path) -> None:
    other = "cron:128b2f33-0c5c-7fd0-a6a3-a4506513270e.json"
    with raises_errno(errno.EEXIST):
        _renameat2(agent / NAME, agent / other, 1)  # RENAME_NOREPLACE
    with raises_errno(errno.EINVAL):
        _renameat2(agent / NAME, agent / other, 2)  # RENAME_EXCHANGE
    with raises_errno(errno.EXDEV):
        os.rename(agent / NAME, agent.parent / "work" / NAME)
    assert (store_dir / BACKING).exists()


def test_entry_written_behind_an_open_writer_is_replaced_last_writer_wins(
    agent: Path, store_dir: Path
) -> None:
    with open(agent / NAME, "r+b") as f:
        with SessionStore(store_dir) as store:
            store.write(KEY, entry_bytes("outside"))
        f.seek(0)
        f.truncate()
        f.write(entry_bytes("inside"))
    assert (store_dir / BACKING).read_bytes() == entry_bytes("inside")


def test_new_entry_is_validated_like_the_store(agent: Path, store_dir: Path) -> None:
    with raises_errno(errno.EINVAL):
        (agent / "cron:x.json").write_bytes(orjson.dumps({"sessionId": "x"}))
    with raises_errno(errno.EINVAL):
        (agent / "cron:y.json").write_bytes(orjson.dumps(entry("../escape")))
    assert not (store_dir / "cron%3Ax.json").exists()
    wait_for(lambda: "cron:x.json" not in os.listdir(agent), what="the refused file to vanish")
