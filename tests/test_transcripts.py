"""Transcripts: `<key>.jsonl` beside each entry, read-only, whole lines only, streamed."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sessionfs.errors import UnsafeEntry
from sessionfs.store import SessionStore
from sessionfs.transcripts import TranscriptFile, transcript_name
from tests.helpers import entry_bytes, peak_rss_kib, raises_errno
from tests.mounting import Mount, mounted, wait_for

KEY = "agent:main:main"
HEADER = b'{"type":"session","id":"s1"}\n'


def event(i: int, pad: int = 0) -> bytes:
    return orjson.dumps({"type": "message", "id": f"e{i}", "text": "x" * pad}) + b"\n"


# -- where a transcript is ------------------------------------------------------------


def test_transcript_name(tmp_path: Path) -> None:
    assert transcript_name({"sessionId": "abc"}, tmp_path) == "abc.jsonl"
    assert transcript_name({"sessionId": "a/b"}, tmp_path) is None  # never a path
    assert transcript_name({"sessionId": "abc", "sessionFile": "t.jsonl"}, tmp_path) == "t.jsonl"
    inside = str(tmp_path / "t.jsonl")
    assert transcript_name({"sessionId": "abc", "sessionFile": inside}, tmp_path) == "t.jsonl"
    elsewhere = {"sessionId": "abc", "sessionFile": "/etc/passwd.jsonl"}
    assert transcript_name(elsewhere, tmp_path) is None
    assert transcript_name({"sessionId": "abc", "sessionFile": "../x.jsonl"}, tmp_path) is None
    assert transcript_name([1], tmp_path) is None


# -- reading whole lines -----------------------------------------------------------------


def test_only_whole_lines_are_read_and_more_as_they_complete(tmp_path: Path) -> None:
    path = tmp_path / "s1.jsonl"
    path.write_bytes(HEADER + b'{"type":"mess')  # the gateway is mid-line
    with TranscriptFile(tmp_path, "s1.jsonl") as transcript:
        assert transcript.complete_size() == len(HEADER)
        assert transcript.read(0, 1 << 20) == HEADER
        assert transcript.read(len(HEADER), 100) == b""  # nothing whole past it yet
        with open(path, "ab") as f:
            f.write(b'age"}\n')
        assert transcript.read(len(HEADER), 100) == b'{"type":"message"}\n'


def test_a_read_near_the_end_does_not_read_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s1.jsonl"
    with open(path, "wb") as f:
        for i in range(20_000):
            f.write(event(i, pad=200))
    size = path.stat().st_size
    read = []
    real_pread = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        read.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    with TranscriptFile(tmp_path, "s1.jsonl") as transcript:
        tail = transcript.read(size - 1000, 1000)
    assert tail == path.read_bytes()[-1000:]
    assert sum(read) < 100_000 < size  # `tail -c 1000` costs a few KB, not 4 MB


def test_never_through_a_symlink_nor_from_a_fifo(tmp_path: Path) -> None:
    (tmp_path / "link.jsonl").symlink_to("/etc/passwd")
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(UnsafeEntry):
        TranscriptFile(tmp_path, "link.jsonl")
    with pytest.raises(UnsafeEntry):
        TranscriptFile(tmp_path, "fifo.jsonl")  # and it did not hang


# -- in the mount ----------------------------------------------------------------------------


@pytest.fixture
def mnt(state_dir: Path, tmp_path: Path) -> Iterator[Mount]:
    with mounted(state_dir, tmp_path / "mnt") as mount:
        yield mount


def sessions_of(state_dir: Path) -> Path:
    return state_dir / "agents/main/sessions"


def session_id(state_dir: Path, key: str = KEY) -> str:
    with SessionStore(sessions_of(state_dir) / "sessions.d") as store:
        value = orjson.loads(store.read(key).data)
    assert isinstance(value, dict)
    return str(value["sessionId"])


@pytest.mark.fuse
def test_each_transcript_shows_beside_its_entry_byte_equal(mnt: Mount, state_dir: Path) -> None:
    sid = session_id(state_dir)
    shown = mnt.path / "main" / f"{KEY}.jsonl"
    assert shown.read_bytes() == (sessions_of(state_dir) / f"{sid}.jsonl").read_bytes()
    st = shown.stat()
    assert st.st_size == len(shown.read_bytes())
    assert st.st_mode & 0o777 == 0o400
    listed = os.listdir(mnt.path / "main")
    for name in listed:
        if name.endswith(".json") and name + "l" not in listed:
            assert not (mnt.path / "main" / (name + "l")).exists()  # no transcript, no file


@pytest.mark.fuse
def test_transcript_names_are_read_only(mnt: Mount, state_dir: Path) -> None:
    agent = mnt.path / "main"
    shown = agent / f"{KEY}.jsonl"
    before = shown.read_bytes()
    with raises_errno(errno.EROFS):
        shown.write_bytes(b"{}\n")
    with raises_errno(errno.EROFS):
        (agent / "cron:new.jsonl").write_bytes(b"{}\n")  # never a scratch file
    with raises_errno(errno.EROFS):
        shown.unlink()
    with raises_errno(errno.EROFS):
        shown.rename(agent / "elsewhere.txt")
    (agent / "notes.txt").write_bytes(b"x")
    with raises_errno(errno.EROFS):
        (agent / "notes.txt").rename(agent / f"{KEY}.jsonl")
    with raises_errno(errno.EROFS):
        os.truncate(shown, 0)
    assert shown.read_bytes() == before
    errors = (mnt.path / ".sessionfs" / "errors").read_text()
    assert f"main/{KEY}.jsonl" in errors
    assert "transcripts are read-only" in errors


@pytest.mark.fuse
def test_tail_f_shows_new_events_within_a_second(mnt: Mount, state_dir: Path) -> None:
    sid = session_id(state_dir)
    backing = sessions_of(state_dir) / f"{sid}.jsonl"
    tail = subprocess.Popen(
        ["tail", "-f", "-s", "0.2", "-n", "0", str(mnt.path / "main" / f"{KEY}.jsonl")],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        assert tail.stdout is not None
        os.set_blocking(tail.stdout.fileno(), False)
        for i in range(3):
            with open(backing, "ab") as f:
                f.write(event(i)[:10])  # half a line first: never shown torn
                f.flush()
                time.sleep(0.3)
                f.write(event(i)[10:])
            written = time.monotonic()
            got = b""

            def shows(i: int = i) -> bool:
                nonlocal got
                got += tail.stdout.read() or b""  # type: ignore[union-attr]
                return got.endswith(event(i))

            wait_for(shows, timeout=1.0, what=f"event {i} in tail -f")
            assert time.monotonic() - written < 1.0
            assert got == event(i)  # whole, once
    finally:
        tail.kill()
        tail.wait()


@pytest.mark.fuse
def test_a_reset_makes_a_new_file_and_the_number_stays_otherwise(
    mnt: Mount, state_dir: Path
) -> None:
    shown = mnt.path / "main" / f"{KEY}.jsonl"
    ino = shown.stat().st_ino
    sid = session_id(state_dir)
    with open(sessions_of(state_dir) / f"{sid}.jsonl", "ab") as f:
        f.write(event(1))
    assert shown.stat().st_ino == ino  # it grew: the same file
    (sessions_of(state_dir) / "reset-1.jsonl").write_bytes(HEADER)
    with SessionStore(sessions_of(state_dir) / "sessions.d") as store:
        store.write(KEY, entry_bytes("reset-1"))

    def shows_the_new_one() -> bool:
        try:
            return shown.read_bytes() == HEADER
        except FileNotFoundError:  # the old file went just as it was opened: look again
            return False

    wait_for(shows_the_new_one, timeout=2, what="the new transcript")
    assert shown.stat().st_ino != ino


@pytest.mark.fuse
def test_a_symlinked_transcript_is_never_shown(mnt: Mount, state_dir: Path) -> None:
    sid = session_id(state_dir)
    backing = sessions_of(state_dir) / f"{sid}.jsonl"
    backing.unlink()
    backing.symlink_to("/etc/passwd")
    assert f"{KEY}.jsonl" not in os.listdir(mnt.path / "main")
    assert not (mnt.path / "main" / f"{KEY}.jsonl").exists()


@pytest.mark.fuse
def test_a_100_mb_transcript_streams_with_bounded_memory(mnt: Mount, state_dir: Path) -> None:
    sid = session_id(state_dir)
    backing = sessions_of(state_dir) / f"{sid}.jsonl"
    line = event(0, pad=1000)
    with open(backing, "wb") as f:
        f.write(line * (100 * 1024 * 1024 // len(line)))
    digest = hashlib.sha256()
    with open(mnt.path / "main" / f"{KEY}.jsonl", "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(backing.read_bytes()).hexdigest()
    assert peak_rss_kib(mnt.pid) < 150 * 1024


def test_a_session_file_through_a_symlinked_state_dir(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    entry = {"sessionId": "abc", "sessionFile": str(real / "t.jsonl")}
    assert transcript_name(entry, tmp_path / "link") == "t.jsonl"


@pytest.mark.fuse
def test_a_transcript_replaced_by_rename_is_a_new_file(mnt: Mount, state_dir: Path) -> None:
    sid = session_id(state_dir)
    backing = sessions_of(state_dir) / f"{sid}.jsonl"
    shown = mnt.path / "main" / f"{KEY}.jsonl"
    ino = shown.stat().st_ino
    replacement = backing.with_name("replacement.tmp")
    replacement.write_bytes(backing.read_bytes() + event(1))
    os.replace(replacement, backing)  # as a gateway that rewrites the file would
    assert shown.stat().st_ino != ino  # so `tail -F` reopens it
    assert shown.read_bytes().endswith(event(1))
