"""Who owns what sessionfs creates: the store's owner, also when root runs it.

``sudo sessionfs mount``, a root daemon from fstab or a root ``migrate`` work on a
user's store.  A root-owned 0600 entry, lock file or history directory there is one
the user's gateway and the user's own ``sessionfs`` commands could not open; so what
root creates in a directory someone else owns is given to that owner.
"""

from __future__ import annotations

import os


def foreign_owner(st: os.stat_result) -> os.stat_result | None:
    """*st* (of a directory) if this process is root and someone else owns it: what it
    creates there is to be theirs (see :func:`adopt`); None otherwise."""
    if os.geteuid() != 0 or (st.st_uid, st.st_gid) == (0, 0):
        return None
    return st


def adopt(fd: int, owner: os.stat_result | None) -> None:
    """Give the file or directory *fd* to *owner* (from :func:`foreign_owner`), if any."""
    if owner is not None:
        os.fchown(fd, owner.st_uid, owner.st_gid)


def adopt_path(path: os.PathLike[str] | str, owner: os.stat_result | None) -> None:
    """:func:`adopt` by path, never through a symlink (for what ``mkdir`` just made)."""
    if owner is not None:
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
