"""``sessionfs history`` and ``sessionfs restore``: see and take back kept versions.

A restore is a normal committed write through the store (validated as the version
was when it was current: not again, so a version migrated without ``updatedAt``
comes back as it was), so the version it replaces is kept in turn and the restore
itself can be undone.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass

from .errors import EntryNotFound, SessionFSError
from .history import Kept
from .keys import key_to_filename
from .show import UsageError, find_agent
from .sources import Era, Source
from .store import SessionStore


@dataclass(frozen=True)
class Restored:
    key: str
    version: Kept


def _store(source: Source, key: str, agent_id: str | None) -> SessionStore:
    agent = find_agent(source, key, agent_id)
    if agent.era() is not Era.DIRECTORY:
        raise UsageError(f"{agent.label} has no sessions.d/ ({agent.era().value}): no history")
    return SessionStore(agent.entries, create=False)


def versions(source: Source, key: str, *, agent_id: str | None = None) -> list[Kept]:
    with _store(source, key, agent_id) as store:
        assert store.history is not None
        return store.history.versions(key_to_filename(key))


def purge(source: Source, key: str, *, agent_id: str | None = None) -> int:
    with _store(source, key, agent_id) as store:
        assert store.history is not None
        return store.history.purge(key_to_filename(key))


def parse_time(text: str) -> float:
    """``--at``: an ISO time (UTC unless it says otherwise) or epoch seconds."""
    if text.replace(".", "", 1).isdigit():
        return float(text)
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(text.removesuffix("Z"), fmt))
        except ValueError:
            continue
    raise UsageError(f"--at {text!r}: expected an ISO time such as 2026-11-30T06:00:00")


def restore(
    source: Source, key: str, *, at: float | None = None, agent_id: str | None = None
) -> Restored:
    """Bring back the newest kept version of *key*, or the one that was current at *at*."""
    with _store(source, key, agent_id) as store:
        assert store.history is not None
        name = key_to_filename(key)
        kept = store.history.versions(name)
        if at is not None:
            # the version current at *at* is the first to stop being current after it
            kept = [k for k in kept if k.stopped > at][:1]
            if not kept:
                raise EntryNotFound(f"{key!r}: the version current at that time is the current one")
        if not kept:
            raise EntryNotFound(f"{key!r} has no kept versions")
        chosen = kept[-1] if at is None else kept[0]
        data = store.history.read(name, chosen)
        try:
            store.write(key, data, validate=False)
        except OSError as exc:
            raise SessionFSError(f"could not restore {key!r}: {exc}") from None
        return Restored(key, chosen)
