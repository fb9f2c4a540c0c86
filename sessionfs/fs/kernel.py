"""Every kernel cache invalidation the mount sends, and whether there is a kernel to tell.

Session files are opened with ``direct_io`` (see :mod:`.index`), so the kernel
never serves their bytes from its page cache: only attributes (``stat``: size,
mtime) and names (the dentry cache) can go stale, and those are all this module
ever invalidates.

Both kinds are safe to send from inside a request handler: an attribute-only
notification takes no inode or page lock in the kernel (``fuse_reverse_inval_inode``
with a negative offset only bumps the attribute version), and entry notifications
go through pyfuse3's own thread (``invalidate_entry_async``), because the kernel
takes the parent directory's lock for them, which a request being handled may hold.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3

log = logging.getLogger("sessionfs")


class Kernel:
    """Tells the kernel what changed; does nothing until the mount is live."""

    def __init__(self) -> None:
        self.mounted = False  # set by the daemon once pyfuse3.init has mounted
        self.invalidations = 0  # changes behind the mount that the kernel was told of

    def forget_attributes(self, ino: int, *, outside: bool = False) -> None:
        """Make the kernel ask for *ino*'s attributes again (size, mtime, mode)."""
        if outside:
            self.invalidations += 1
        if not self.mounted:
            return
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel did not know it
                log.warning("attribute invalidation of inode %d failed: %s", ino, exc)

    def forget_name(self, parent_ino: int, name: str) -> None:
        """Make the kernel drop *name* in directory *parent_ino* (it went, or changed inode)."""
        if self.mounted:
            pyfuse3.invalidate_entry_async(parent_ino, name.encode(), ignore_enoent=True)
