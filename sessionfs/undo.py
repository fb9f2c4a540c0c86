"""``sessionfs history`` and ``sessionfs restore``: see and take back kept versions.

A restore is a normal committed write through the store (validated as the version
was when it was current: not again, so a version migrated without ``updatedAt``
comes back as it was), so the version it replaces is kept in turn and the restore
itself can be undone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import orjson

from . import entry as entry_rules
from .errors import EntryNotFound, SessionFSError
from .history import Actor, History, Kept
from .keys import key_to_filename
from .show import UsageError, find_agent
from .sources import AgentStore, Era, Source
from .store import SessionStore

_T = TypeVar("_T")


@dataclass(frozen=True)
class Restored:
    key: str
    version: Kept


def _store(source: Source, key: str, agent_id: str | None) -> SessionStore:
    try:
        agent = find_agent(source, key, agent_id)
    except EntryNotFound:
        agent = _agent_with_history(source, key)  # a removed key lives on there
    if agent.era() is not Era.DIRECTORY:
        raise UsageError(f"{agent.label} has no sessions.d/ ({agent.era().value}): no history")
    return SessionStore(agent.entries, create=False)


def _agent_with_history(source: Source, key: str) -> AgentStore:
    name = key_to_filename(key)
    holders = []
    for agent in source.stores():
        if agent.era() is Era.DIRECTORY:
            with SessionStore(agent.entries, create=False) as store:
                if store.history is not None and store.history.versions(name):
                    holders.append(agent)
    if len(holders) == 1:
        return holders[0]
    if not holders:
        raise EntryNotFound(f"no session {key!r} and no kept versions of it under {source.path}")
    where = ", ".join(a.label for a in holders)
    raise UsageError(f"kept versions of {key!r} are in {where}; pick one with --agent ID")


def _history(store: SessionStore) -> History:
    if store.history is None:
        raise UsageError("this store keeps no history")
    return store.history


def versions(source: Source, key: str, *, agent_id: str | None = None) -> list[Kept]:
    with _store(source, key, agent_id) as store:
        return _readable(lambda: _history(store).versions(key_to_filename(key)))


def purge(source: Source, key: str, *, agent_id: str | None = None) -> int:
    with _store(source, key, agent_id) as store:
        return _readable(lambda: _history(store).purge(key_to_filename(key)))


def _readable(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except OSError as exc:
        if isinstance(exc, SessionFSError):
            raise
        raise SessionFSError(f"cannot read the kept versions: {exc.strerror or exc}") from None


def parse_time(text: str) -> float:
    """``--at``: an ISO time (UTC unless it says otherwise; as ``history`` prints it) or
    epoch seconds."""
    with contextlib.suppress(ValueError):
        return float(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--at {text!r}: expected an ISO time such as 2026-11-30T06:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def restore(
    source: Source, key: str, *, at: float | None = None, agent_id: str | None = None
) -> Restored:
    """Bring back the newest kept version of *key*, or the one that was current at *at*.

    The version current at a time is the one written before it and replaced after it.
    """
    with _store(source, key, agent_id) as store:
        history = _history(store)
        name = key_to_filename(key)
        kept = _readable(lambda: history.versions(name))
        if not kept:
            raise EntryNotFound(f"{key!r} has no kept versions")
        chosen = kept[-1]
        if at is not None:
            current_then = [k for k in kept if k.began <= at < k.stopped]
            if not current_then:
                later = [k for k in kept if k.stopped > at]
                if later and later[0].began > at:
                    raise EntryNotFound(f"{key!r} had no kept version current at that time")
                raise EntryNotFound(f"{key!r}: the version current at that time is the current one")
            chosen = current_then[0]
        data = _readable(lambda: history.read(name, chosen, store.max_entry_bytes))
        mtime_ns = None
        with contextlib.suppress(orjson.JSONDecodeError):  # its activity time, if it says one
            mtime_ns = entry_rules.activity_ns(orjson.loads(data))
        try:
            store.write(
                key,
                data,
                validate=False,
                actor=Actor.this_process("sessionfs restore"),
                op="restored",
                mtime_ns=mtime_ns,
            )
        except OSError as exc:
            raise SessionFSError(f"could not restore {key!r}: {exc}") from None
        return Restored(key, chosen)
