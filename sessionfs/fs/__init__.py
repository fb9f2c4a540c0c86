"""The FUSE layer: translates kernel requests into store calls and owns no disk I/O.

:func:`assemble` builds the parts of one mount and wires them together, each
receiving its collaborators through its constructor:

``operations`` -> ``names`` / ``editing`` -> ``index`` -> ``tree``, all of them ->
``kernel`` (invalidations) and ``backings`` (the stores, in worker threads);
``watcher`` -> ``index``; ``control`` renders ``.sessionfs/``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import trio

from ..catalog import Catalog
from ..entry import DEFAULT_MAX_ENTRY_BYTES
from .backings import Backings
from .cache import ContentCache
from .control import ControlFiles, MountStatistics
from .editing import CONFLICT_FAIL, CONFLICT_LAST_WINS, Editing, Limits
from .grace import GracePeriods
from .history_view import HistoryView
from .index import Index
from .kernel import Kernel
from .names import Names
from .operations import Operations
from .quick import QuickCalls
from .requests import Rejections, Requests
from .tree import Owner, Tree
from .watcher import Watcher

__all__ = [
    "CONFLICT_FAIL",
    "CONFLICT_LAST_WINS",
    "Filesystem",
    "Limits",
    "assemble",
]


@dataclass(frozen=True)
class Filesystem:
    """The parts of one mount that the daemon (and the tests) handle directly."""

    operations: Operations
    editing: Editing
    graces: GracePeriods
    index: Index
    watcher: Watcher
    kernel: Kernel
    control: ControlFiles
    # Set when the mount ends: background work in worker threads stops at its next step.
    stopping: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        """The mount ends: nothing waits any longer for a key another process holds."""
        self.stopping.set()
        self.editing.backings.stop()


def assemble(
    catalog: Catalog,
    *,
    cache_timeout: float = 1.0,
    debug: bool = False,
    conflict: str = CONFLICT_LAST_WINS,
    limits: Limits | None = None,
    limiter: trio.CapacityLimiter | None = None,
    clock: Callable[[], float] = time.monotonic,
    quick: QuickCalls | None = None,
    log: str = "stderr",
    uid: int | None = None,
    gid: int | None = None,
) -> Filesystem:
    """Build every part of a mount of *catalog*'s stores.

    *quick* lets an update's commit and stat skip trio's thread hop while the disk
    is fast (see :mod:`.quick`); race tests pass a disabled one, so that every
    store call they pause runs in a worker thread of trio's.
    """
    tree = Tree()
    tree.root.holds_sessions = not catalog.per_agent
    kernel = Kernel()
    backings = Backings(catalog, limiter, quick)
    content = ContentCache()
    index = Index(tree, backings, kernel, content)
    owner = Owner.current(cache_timeout, uid, gid)  # who owns what the mount shows
    rejections = Rejections()

    def statistics() -> MountStatistics:
        return MountStatistics(
            requests=dict(requests.counts),
            request_ms={k: round(v * 1e3, 3) for k, v in requests.seconds.items()},
            store_calls=dict(backings.calls),
            rejected_writes=rejections.total,
            rejected_by_agent=dict(rejections.by_agent),
            invalidations=kernel.invalidations,
            rescans=watcher.rescans,
            own_renames=watcher.own_renames,
            inodes=len(tree.nodes),
            open_files=len(editing.handles),
            scratch_bytes=tree.scratch_bytes(),
            grace_periods=len(graces),
            last_check=control.last_check,
        )

    async def recent_audit() -> bytes:
        lines = await backings.thread(catalog.recent_audit)
        return b"".join(orjson.dumps(line) + b"\n" for line in lines)

    control = ControlFiles(
        tree,
        source=catalog.source.path,
        statistics=statistics,
        rejections=rejections,
        audit=recent_audit,
        log=log,
    )
    history = HistoryView(tree, backings, catalog, control.directory)
    names = Names(tree, index, backings, catalog, owner, history)
    limits = limits or Limits(max_entry_bytes=DEFAULT_MAX_ENTRY_BYTES)
    graces = GracePeriods(tree, index, backings, kernel, seconds=limits.grace_seconds, clock=clock)
    editing = Editing(
        tree,
        index,
        names,
        backings,
        kernel,
        content,
        rejections,
        graces,
        limits,
        conflict=conflict,
    )
    requests = Requests(debug=debug)
    watcher = Watcher(catalog, index, backings)
    operations = Operations(tree, names, editing, backings, requests)
    return Filesystem(operations, editing, graces, index, watcher, kernel, control)
