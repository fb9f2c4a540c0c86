"""``sessionfs export``: every session of any era as one JSON document.

For one agent the document is ``{key: entry}``, the shape of ``sessions.json``, so
a copy can be handed to a JSON-era gateway or to ``openclaw doctor --session-sqlite
import``; for a state dir it is ``{agentId: {key: entry}}``.  Each agent is read
from the store its era says it lives in (:meth:`~.sources.AgentStore.era`): the
SQLite database, ``sessions.d/`` or ``sessions.json``; an agent upgraded to SQLite
after a migration keeps a ``sessions.d/`` that ``--sessions-d`` exports instead.
Nothing is ever written to a store.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from . import entry as entry_rules
from .errors import SessionFSError
from .legacy import LegacyView
from .sources import AgentStore, Era, Source, SourceKind
from .sqlite_view import SqliteView
from .store import SessionStore, Snapshot


class Entries(Protocol):
    """What every era's store offers a reader: its keys, and one entry's bytes."""

    def keys(self) -> Any: ...

    def read(self, key: str) -> Snapshot: ...


@dataclass
class Export:
    """The document, and what could not go into it (printed on stderr)."""

    document: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def dumps(self) -> bytes:
        return entry_rules.dumps(self.document) + b"\n"  # lone surrogates as Node writes them


@contextlib.contextmanager
def era_entries(agent: AgentStore, *, sessions_d: bool = False) -> Iterator[Entries | None]:
    """The entries of *agent* in the store its era says (None: it has none), read-only."""
    era = agent.era()
    if (sessions_d and agent.has_entries()) or era is Era.DIRECTORY:
        with SessionStore(agent.entries, create=False) as store:
            yield store
    elif era is Era.SQLITE:
        view = SqliteView(agent.database)
        try:
            yield view
        finally:
            view.close()
    elif era is Era.JSON:
        yield LegacyView(agent.legacy)
    else:
        yield None


def export_agent(agent: AgentStore, out: Export, *, sessions_d: bool = False) -> dict[str, Any]:
    """*agent*'s entries as ``{key: entry}``; unreadable ones are named in *out*."""
    entries: dict[str, Any] = {}
    if agent.era() is Era.SQLITE and agent.has_entries() and not sessions_d:
        out.notes.append(
            f"{agent.label}: also has a sessions.d/ from before its upgrade to SQLite; "
            "--sessions-d exports that instead"
        )
    try:
        with era_entries(agent, sessions_d=sessions_d) as reader:
            if reader is None:
                out.notes.append(f"{agent.label}: no sessions (no database, sessions.d/ or json)")
                return entries
            keys = sorted(reader.keys())
            if isinstance(reader, SqliteView) and reader.problem is not None:
                out.problems.append(f"{agent.label}: {reader.problem}")  # an unknown schema
            for key in keys:
                try:
                    entries[key] = entry_rules.loads(reader.read(key).data)
                except (SessionFSError, OSError, orjson.JSONDecodeError) as exc:
                    out.problems.append(f"{agent.label}: {key!r} left out: {exc}")
    except (SessionFSError, OSError, sqlite3.Error) as exc:  # a store that cannot be read
        out.problems.append(f"{agent.label}: not exported: {exc}")
    return entries


def export_source(
    source: Source, *, agent_id: str | None = None, sessions_d: bool = False
) -> Export:
    """The export of *source*: flat for one store or ``--agent``, else by agent id."""
    out = Export()
    stores = source.stores()
    sessions_d = sessions_d or source.kind is SourceKind.ENTRIES_DIR  # what was named
    out.notes += [f"{name}: skipped: {why}" for name, why in source.skipped]
    if agent_id is not None:
        chosen = [agent for agent in stores if agent.owner == agent_id]
        if not chosen:
            raise SessionFSError(f"no agent {agent_id!r} in {source.path}")
        out.document = export_agent(chosen[0], out, sessions_d=sessions_d)
    elif len(stores) == 1 and stores[0].agent_id is None:  # a sessions dir, not a state dir
        out.document = export_agent(stores[0], out, sessions_d=sessions_d)
    else:
        for agent in stores:
            out.document[agent.label] = export_agent(agent, out, sessions_d=sessions_d)
    return out
