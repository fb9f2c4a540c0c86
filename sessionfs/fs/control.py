"""The files under ``MOUNTPOINT/.sessionfs/``: what the daemon is, serves, counted and refused.

They are computed when read and opened with ``direct_io``, so every read is fresh
and ``sessionfs status`` (or a dead-mount probe) always reaches the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from ..mounts import CONTROL_DIR
from .requests import Rejections
from .tree import Dir, Tree


@dataclass(frozen=True, slots=True)
class MountStatistics:
    """What ``.sessionfs/stats`` shows.  Counters are totals since the mount began."""

    requests: Mapping[str, int]  # requests answered, per kind
    request_ms: Mapping[str, float]  # time spent answering them, per kind
    store_calls: Mapping[str, int]  # calls into the stores (disk I/O), per kind; "(quick)":
    # of those, the ones answered by the quick thread (see fs/quick.py)
    inodes: int  # now: nodes the daemon holds
    open_files: int  # now
    scratch_bytes: int  # now: editor and tool temporaries held in memory
    grace_periods: int  # now: sessions renamed away or removed whose undo is still possible
    rejected_writes: int
    invalidations: int  # changes behind the mount the kernel was told of
    rescans: int  # after inotify overflows
    own_renames: int  # events of the mount's own commits that needed no stat

    def render(self) -> bytes:
        fields = asdict(self)
        fields["watcher"] = {
            "invalidations": fields.pop("invalidations"),
            "rescans": fields.pop("rescans"),
            "own_renames": fields.pop("own_renames"),
        }
        return orjson.dumps(fields, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


class ControlFiles:
    """Puts ``.sessionfs/`` and its files into the tree."""

    def __init__(
        self,
        tree: Tree,
        *,
        source: Path,
        statistics: Callable[[], MountStatistics],
        rejections: Rejections,
        audit: Callable[[], Awaitable[bytes]] | None = None,
        log: str = "stderr",
    ) -> None:
        self.directory: Dir = tree.subdir(tree.root, CONTROL_DIR)
        # What the daemon's last background fsck found, set by the daemon; reading
        # the file never starts a scan (a status must stay cheap on a big store).
        self.last_check: bytes = b"no background check has finished yet\n"
        self.files = {
            "pid": f"{os.getpid()}\n".encode,
            "source": f"{source}\n".encode,
            "stats": lambda: statistics().render(),
            "errors": rejections.render,
            "fsck": lambda: self.last_check,
            "log": f"{log}\n".encode,  # where the daemon logs (`sessionfs status`)
        }
        for name, render in self.files.items():
            tree.control(self.directory, name, render)
        if audit is not None:  # the recent changes of every agent, one JSON line each
            tree.control(self.directory, "audit", lambda: b"", load=audit)
