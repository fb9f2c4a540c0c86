"""The files under ``MOUNTPOINT/.sessionfs/``: what the daemon is, serves, counted and refused.

They are computed when read and opened with ``direct_io``, so every read is fresh
and ``sessionfs status`` (or a dead-mount probe) always reaches the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..fsck import CheckSummary
from ..mounts import CONTROL_DIR
from .requests import Rejections
from .tree import Dir, Tree


@dataclass(frozen=True, slots=True)
class MountStatistics:
    """What ``.sessionfs/stats`` shows, grouped by what a number counts.

    ``since_mount`` holds totals that only grow while the mount lives, ``now`` what
    the daemon holds at the moment of the read, ``last_check`` the verdict per agent
    of the newest background check (null before the first one ends).
    """

    requests: Mapping[str, int]  # requests answered, per kind
    request_ms: Mapping[str, float]  # time spent answering them, per kind
    store_calls: Mapping[str, int]  # calls into the stores (disk I/O), per kind; "(quick)":
    # of those, the ones answered by the quick thread (see fs/quick.py)
    rejected_writes: int
    rejected_by_agent: Mapping[str, int]  # "" for writes outside an agent's directory
    invalidations: int  # changes behind the mount the kernel was told of
    rescans: int  # after inotify overflows
    own_renames: int  # events of the mount's own commits that needed no stat
    inodes: int  # nodes the daemon holds
    open_files: int
    scratch_bytes: int  # editor and tool temporaries held in memory
    grace_periods: int  # sessions renamed away or removed whose undo is still possible
    last_check: CheckSummary | None

    def render(self) -> bytes:
        check = self.last_check
        fields = {
            "since_mount": {
                "requests": self.requests,
                "request_ms": self.request_ms,
                "store_calls": self.store_calls,
                "rejected_writes": {
                    "total": self.rejected_writes,
                    "by_agent": self.rejected_by_agent,
                },
                "watcher": {
                    "invalidations": self.invalidations,
                    "rescans": self.rescans,
                    "own_renames": self.own_renames,
                },
            },
            "now": {
                "inodes": self.inodes,
                "open_files": self.open_files,
                "scratch_bytes": self.scratch_bytes,
                "grace_periods": self.grace_periods,
            },
            "last_check": None
            if check is None
            else {"finished": check.finished, "agents": check.verdicts},
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
        self.last_check: CheckSummary | None = None
        self.files = {
            "pid": f"{os.getpid()}\n".encode,
            "source": lambda: os.fsencode(source) + b"\n",  # its bytes, UTF-8 or not
            "stats": lambda: statistics().render(),
            "errors": rejections.render,
            "fsck": self._render_last_check,
            "log": lambda: os.fsencode(log) + b"\n",  # where the daemon logs (`sessionfs status`)
        }
        for name, render in self.files.items():
            tree.control(self.directory, name, render)
        if audit is not None:  # the recent changes of every agent, one JSON line each
            tree.control(self.directory, "audit", lambda: b"", load=audit)

    def _render_last_check(self) -> bytes:
        if self.last_check is None:
            return b"no background check has finished yet\n"
        return self.last_check.render()
