"""The kernel's mount table as sessionfs needs it, without the daemon's dependencies.

Commands that only read a store (``ls``, ``show``, ``export``...) accept a mountpoint
as SOURCE and use the mount's own source; they must not pull in pyfuse3 or trio for
that, and must never hang on a daemon that does not answer.
"""

from __future__ import annotations

import errno
import os
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

FS_TYPE = "fuse.sessionfs"
CONTROL_DIR = ".sessionfs"
CONTROL_TIMEOUT = 3.0  # seconds a command waits for a daemon to answer


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    read_only: bool = False  # mounted ro (the per-mount options say so)


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def absolute(path: Path) -> Path:
    """*path* made absolute as the kernel reads it (links resolved before ``..``), its
    last component never stat'ed: it may be a dead or hung mount."""
    joined = os.path.join(os.getcwd(), os.fspath(path))
    head, tail = os.path.split(joined)
    if tail in ("", ".", ".."):
        return Path(os.path.realpath(joined))
    return Path(os.path.realpath(head)) / tail


def mount_table() -> list[MountEntry]:
    """Every mount this process can see, oldest first (``/proc/self/mountinfo``)."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) >= 6 and len(tail) >= 2:
                read_only = "ro" in fields[5].split(",")
                entries.append(
                    MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]), read_only)
                )
    return entries


def find_mount(path: Path) -> MountEntry | None:
    """The mount whose mount point is exactly *path* (the newest one), if any."""
    target = str(absolute(path))
    found = None
    for entry in mount_table():
        if entry.mountpoint == target:
            found = entry
    return found


def sessionfs_mounts() -> list[Path]:
    """The mountpoints of every sessionfs mount this process can see."""
    return [Path(entry.mountpoint) for entry in mount_table() if entry.fstype == FS_TYPE]


# What libfuse's option syntax and pyfuse3 (ASCII) carry as they are; any other
# byte of a source's path is written %XX in the mount's name.
_FSNAME_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-+:@~")
_FSNAME_MAX = 1024


def fsname_for(source: Path) -> str:
    """The name a mount of *source* has in the mount table: its path, readable by
    every user (``df``, ``findmnt``, another user's commands) without asking the
    daemon, which may be hung or may not let them in.  ``sessionfs`` when too long."""
    name = "".join(
        chr(byte) if byte in _FSNAME_PLAIN else f"%{byte:02X}" for byte in os.fsencode(source)
    )
    return name if len(name) <= _FSNAME_MAX else "sessionfs"


def source_of(entry: MountEntry) -> Path | None:
    """The source a sessionfs mount names in the mount table (None: it names none)."""
    if not entry.source.startswith("/"):
        return None
    return Path(os.fsdecode(urllib.parse.unquote_to_bytes(entry.source)))


def control_line(path: Path, name: str, timeout: float = CONTROL_TIMEOUT) -> str:
    """A one-line file of MOUNTPOINT/.sessionfs/ (a path: only its newline is cut, a
    source may end in a space)."""
    return read_control(path, name, timeout).removesuffix("\n")


def read_control(path: Path, name: str, timeout: float = CONTROL_TIMEOUT) -> str:
    """A file of MOUNTPOINT/.sessionfs/, or ETIMEDOUT if the daemon does not answer.

    Read in a thread so a hung daemon cannot hang the command that asks it.
    """
    result: list[str | OSError] = []
    done = threading.Event()

    def read() -> None:
        try:
            result.append(os.fsdecode((path / CONTROL_DIR / name).read_bytes()))
        except OSError as exc:
            result.append(exc)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout):
        raise OSError(errno.ETIMEDOUT, "the daemon did not answer in time")
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def mount_holding(path: Path) -> tuple[MountEntry, Path] | None:
    """``(the mount, path inside it)`` if *path* is a sessionfs mount or lies in one.

    Decided from the mount table alone: nothing is asked of the mount itself.  A
    symlink to a mount (or into one) is followed by reading the links, never by a
    ``stat`` that a hung daemon would have to answer.
    """
    mounts = [(Path(e.mountpoint), e) for e in mount_table() if e.fstype == FS_TYPE]
    target = absolute(path)
    for _ in range(_MAX_LINKS):
        best: tuple[Path, MountEntry] | None = None
        for mountpoint, entry in mounts:
            if (target == mountpoint or mountpoint in target.parents) and (
                best is None or len(mountpoint.parts) > len(best[0].parts)
            ):
                best = mountpoint, entry
        if best is not None:
            return best[1], target.relative_to(best[0])
        try:
            target = absolute(Path(os.path.join(target.parent, os.readlink(target))))
        except OSError:  # not a link (EINVAL), or not ours to look at
            return None
    return None


_MAX_LINKS = 40  # as the kernel's path walk allows
