"""A read-only view of a legacy ``sessions.json``, for mounts with ``--no-migrate``.

Each entry is served the way migration would write it (2-space indent), so what a
user sees before migrating is what they get after.  The file is parsed again only
when it changes.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any, NoReturn

from . import entry as entry_rules
from .errors import EntryNotFound, ReadOnlyStore, SessionFSError
from .store import Snapshot


class LegacyView:
    """The entries of one ``sessions.json``, reparsed when the file's identity changes."""

    writable = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._identity: tuple[int, int, int] | None = None
        self._entries: dict[str, bytes] = {}
        self._stat: os.stat_result | None = None

    def _load(self) -> tuple[dict[str, bytes], os.stat_result]:
        st = os.stat(self.path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise SessionFSError(f"{self.path} is not a regular file")
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if identity != self._identity:
                raw: Any = entry_rules.loads(self.path.read_bytes() or b"{}")
                if not isinstance(raw, dict):
                    raw = {}
                self._entries = {key: entry_rules.dumps(value) for key, value in raw.items()}
                self._identity, self._stat = identity, st
            assert self._stat is not None
            return self._entries, self._stat

    def _entry_stat(self, data: bytes, file_stat: os.stat_result) -> os.stat_result:
        fields = (
            stat.S_IFREG | 0o400,
            file_stat.st_ino,
            file_stat.st_dev,
            1,
            file_stat.st_uid,
            file_stat.st_gid,
            len(data),
        )
        times = (int(file_stat.st_atime), int(file_stat.st_mtime), int(file_stat.st_ctime))
        return os.stat_result(
            fields + times,
            {
                "st_atime_ns": file_stat.st_atime_ns,
                "st_mtime_ns": file_stat.st_mtime_ns,
                "st_ctime_ns": file_stat.st_ctime_ns,
            },
        )

    def read(self, key: str) -> Snapshot:
        entries, file_stat = self._load()
        try:
            data = entries[key]
        except KeyError:
            raise EntryNotFound(f"no session {key!r}") from None
        return Snapshot(data, self._entry_stat(data, file_stat))

    def stat(self, key: str) -> os.stat_result:
        return self.read(key).stat

    def keys(self) -> list[str]:
        return list(self._load()[0])

    def stat_many(self, keys: list[str]) -> list[os.stat_result | None]:
        entries, file_stat = self._load()
        return [
            self._entry_stat(entries[key], file_stat) if key in entries else None for key in keys
        ]

    def why_read_only(self) -> str:
        return f"{self.path} is a legacy store shown read-only; run `sessionfs migrate` to edit it"

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise ReadOnlyStore(self.why_read_only())

    write = delete = remove = rename = update = _refuse
