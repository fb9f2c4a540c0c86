"""Transcripts as files: where a session's transcript is, and reading it one whole line at a time.

A transcript (``<sessionId>.jsonl``) is appended to by the gateway while people
read it, so a read may meet a line that is only half written.  Readers here see
only whole lines: the end of what can be read is the byte after the last newline
(:meth:`TranscriptFile.complete_size`), taken anew whenever a read reaches it, so
``tail -f`` sees each event once it is complete and ``wc -l`` or ``jq -c`` never
see a torn one.  Nothing is read whole: reads are ``pread`` at the asked offset.

A transcript is never opened through a symlink (``O_NOFOLLOW`` on an ``openat`` in
the sessions dir), and only a regular file is read (``O_NONBLOCK`` first, so a
FIFO under a transcript's name cannot hang the reader).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Protocol

from .entry import SESSION_ID_RE, loads
from .errors import EntryNotFound, UnsafeEntry

SUFFIX = ".jsonl"
TAIL_CHUNK = 64 * 1024  # how far back one look for the last newline reads


def transcript_name(entry: object, sessions_dir: Path) -> str | None:
    """The file name, in *sessions_dir*, of the current transcript of *entry*.

    The entry's ``sessionFile`` when it names a file in that directory (a path
    elsewhere is never followed), else ``<sessionId>.jsonl``; None without either.
    """
    if not isinstance(entry, dict):
        return None
    session_file = entry.get("sessionFile")
    if isinstance(session_file, str) and session_file:
        path = Path(session_file)
        if (not path.is_absolute() and len(path.parts) == 1) or _same_dir(
            path.parent, sessions_dir
        ):
            name = path.name
            if name.endswith(SUFFIX) and not name.startswith(".") and "/" not in name:
                return name
        return None
    session_id = entry.get("sessionId")
    if isinstance(session_id, str) and SESSION_ID_RE.match(session_id):
        return session_id + SUFFIX
    return None


def _same_dir(a: Path, b: Path) -> bool:
    """Whether two spellings name one directory (a state dir reached through a symlink)."""
    return a == b or os.path.realpath(a) == os.path.realpath(b)


class TranscriptStream(Protocol):
    """An open transcript, a file's or a database's: whole lines, read at any offset."""

    def read(self, offset: int, size: int) -> bytes: ...

    def complete_size(self) -> int: ...

    def close(self) -> None: ...


class TranscriptFile:
    """One open transcript; blocking calls (the mount runs them in worker threads)."""

    def __init__(self, sessions_dir: Path, name: str) -> None:
        dir_fd = os.open(sessions_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fd = os.open(
                    name,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=dir_fd,
                )
            except FileNotFoundError:
                raise EntryNotFound(f"transcript {name} does not exist") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeEntry(f"transcript {name} is a symlink; not followed") from None
                raise
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsafeEntry(f"transcript {name} is not a regular file; not read")
        self.name = name
        self.fd = fd
        self._complete = 0  # known end of the whole lines (grows, never shrinks)

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def complete_size(self) -> int:
        """Bytes up to and including the last newline now: what can be read."""
        size = os.fstat(self.fd).st_size
        if size < self._complete:  # truncated or replaced in place: start again
            self._complete = 0
        end = size
        while end > self._complete:
            start = max(self._complete, end - TAIL_CHUNK)
            chunk = os.pread(self.fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                self._complete = start + newline + 1
                break
            end = start
        return self._complete

    def read(self, offset: int, size: int) -> bytes:
        """Up to *size* bytes at *offset*, never past the last whole line."""
        end = self._complete
        if offset + size > end:
            end = self.complete_size()
        if offset >= end:
            return b""
        return os.pread(self.fd, min(size, end - offset), offset)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TranscriptFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def complete_size(sessions_dir: Path, name: str) -> tuple[os.stat_result, int] | None:
    """The transcript's stat and readable size, or None when it is missing or unsafe."""
    try:
        with TranscriptFile(sessions_dir, name) as transcript:
            return transcript.stat(), transcript.complete_size()
    except (EntryNotFound, UnsafeEntry):
        return None


def transcript_stat(
    sessions_dir: Path, name: str, *, sized: bool
) -> tuple[os.stat_result, int] | None:
    """A transcript's stat and size: readable (whole lines) with *sized*, else its file size.

    None when it is missing, or not a regular file (never followed).
    """
    if sized:
        return complete_size(sessions_dir, name)
    try:
        st = os.lstat(sessions_dir / name)
    except OSError:
        return None
    return (st, st.st_size) if stat.S_ISREG(st.st_mode) else None


def parsed(data: bytes) -> object:
    """An entry's JSON, or None when it is not JSON (then it names no transcript)."""
    try:
        return loads(data)
    except ValueError:
        return None


def transcript_files(sessions_dir: Path) -> dict[str, tuple[os.stat_result, int]]:
    """Every regular ``*.jsonl`` file of *sessions_dir* with its stat and size, in one pass."""
    found: dict[str, tuple[os.stat_result, int]] = {}
    try:
        with os.scandir(sessions_dir) as entries:
            for entry in entries:
                if entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        st = entry.stat(follow_symlinks=False)
                        found[entry.name] = (st, st.st_size)
    except OSError:
        return {}
    return found
