"""Small builders shared by the tests."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest


def entry(
    session_id: str = "s1", updated_at: int = 1_700_000_000_000, **fields: object
) -> dict[str, object]:
    return {"sessionId": session_id, "updatedAt": updated_at, **fields}


def entry_bytes(
    session_id: str = "s1", updated_at: int = 1_700_000_000_000, **fields: object
) -> bytes:
    return orjson.dumps(entry(session_id, updated_at, **fields), option=orjson.OPT_INDENT_2)


@contextlib.contextmanager
def raises_errno(*codes: int) -> Iterator[None]:
    """Expect an OSError whose errno is one of *codes*."""
    with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is what is checked
        yield
    assert info.value.errno in codes, info.value


def peak_rss_kib(pid: int) -> int:
    """The peak resident memory of process *pid* (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def vim_save(directory: Path, name: str, backupcopy: str) -> subprocess.CompletedProcess[str]:
    """vim edits *name* in *directory* and saves it, its backup beside it (``.``)."""
    commands = (
        "set backupskip=",
        f"set backupcopy={backupcopy}",
        "set backupdir=.",
        "set writebackup",
        '%s/"chatType": "direct"/"chatType": "vim"/',
        "wq",
    )
    args = [arg for command in commands for arg in ("-c", command)]
    return subprocess.run(
        ["vim", "-u", "NONE", "-N", "-es", *args, name],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
