"""sessionfs: OpenClaw's session store as one file per session, and a FUSE mount over it."""

from .entry import validate
from .errors import (
    EntryExists,
    EntryNotFound,
    InvalidEntry,
    InvalidKey,
    LockTimeout,
    NoStore,
    SessionFSError,
    UnsafeEntry,
)
from .keys import display_to_key, filename_to_key, key_to_display, key_to_filename, normalize_key
from .store import ABSENT, AsyncSessionStore, Commit, EntryChanged, SessionStore, Snapshot, Version

__version__ = "0.1.0"

__all__ = [
    "ABSENT",
    "AsyncSessionStore",
    "Commit",
    "EntryChanged",
    "EntryExists",
    "EntryNotFound",
    "InvalidEntry",
    "InvalidKey",
    "LockTimeout",
    "NoStore",
    "SessionFSError",
    "SessionStore",
    "Snapshot",
    "UnsafeEntry",
    "Version",
    "__version__",
    "display_to_key",
    "filename_to_key",
    "key_to_display",
    "key_to_filename",
    "normalize_key",
    "validate",
]
