"""``sessionfs log``: who changed which session, when, and which fields.

Two records meet here.  The audit (``.history/audit.jsonl``) has one line per
change made through the mount, by ``maintain`` or by ``restore``: who (uid, pid,
program), what, and the kept name of the version that went.  The history has
every version that went through the store.  A kept version that no audit line
names went by a change outside the mount (a program using the store directly):
it is shown as "outside" with what the history saw (replaced or removed).

Which top-level fields a change touched is computed from the two versions: the
one that went (kept) and the one that followed (the next kept one, or the
current entry).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from .errors import EntryNotFound
from .history import Kept
from .keys import filename_to_key, key_to_filename
from .show import UsageError
from .sources import AgentStore, Era, Source
from .store import SessionStore

# A version made current this close after the one before it stopped is that one's
# replacement; a later one followed a removal (the keep is stamped before the write).
REPLACED_WITHIN = 2.0


@dataclass(frozen=True)
class Change:
    """One change of one key, as ``sessionfs log`` prints it."""

    time: str
    key: str
    what: str
    who: str  # "cp[1234] uid 1000", or "outside"
    agent: str | None = None
    fields: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = f"{self.agent}/" if self.agent is not None else ""
        fields = f"  fields: {', '.join(self.fields)}" if self.fields else ""
        return f"{self.time}  {self.who:<28}  {self.what:<26}  {where}{self.key}{fields}"

    def json(self) -> bytes:
        return orjson.dumps(
            {
                "time": self.time,
                "agent": self.agent,
                "key": self.key,
                "what": self.what,
                "who": self.who,
                "fields": self.fields,
            }
        )


def changes(source: Source, key: str | None = None, *, agent_id: str | None = None) -> list[Change]:
    """The changes of *key* (or of every key) under *source*, newest first."""
    found: list[Change] = []
    agents = [a for a in source.stores() if agent_id is None or a.agent_id == agent_id]
    if agent_id is not None and not agents:
        raise UsageError(f"no agent {agent_id!r} under {source.path}")
    for agent in agents:
        if agent.era() is not Era.DIRECTORY:
            continue
        with SessionStore(agent.entries, create=False) as store:
            found += _store_changes(store, agent, key)
    if key is not None and not found:
        raise EntryNotFound(f"no recorded change of {key!r} under {source.path}")
    return sorted(found, key=lambda c: c.time, reverse=True)


def _store_changes(store: SessionStore, agent: AgentStore, only: str | None) -> Iterator[Change]:
    history = store.history
    audit = history.audit()
    # a kept name is unique within its key's versions: (key, kept name) -> audit line
    named = {
        (line.get("key"), line["old"]): line for line in audit if isinstance(line.get("old"), str)
    }
    label = agent.agent_id
    names = [key_to_filename(only)] if only is not None else history.names()
    shown: set[tuple[object, object]] = set()  # (key, kept name) told of already
    for name in names:
        key = filename_to_key(name)
        if key is None:
            continue
        timeline = _Timeline(store, key, name)
        for i, kept in enumerate(timeline.kept):
            shown.add((key, kept.name))
            after = timeline.successor(i)
            fields = [] if after is None else _changed_fields(timeline.bytes_of(kept), after)
            line = named.get((key, kept.name))
            if line is None:
                what = "replaced" if after is not None else "removed"
                yield Change(kept.when, key, what, "outside", label, fields)
            else:
                yield _audited(line, label, fields)
    # the rest: creations, renames that replaced nothing, and changes whose kept
    # version was pruned since
    for line in audit:
        if (line.get("key"), line.get("old")) in shown:
            continue
        if only is None or only in (line.get("key"), line.get("renamed_from")):
            yield _audited(line, label, [])


def _audited(line: dict[str, object], agent: str | None, fields: list[str]) -> Change:
    who = f"{line.get('program', '?')}[{line.get('pid', '?')}] uid {line.get('uid', '?')}"
    key = str(line.get("key", ""))
    what = str(line.get("op", "changed"))
    if "renamed_from" in line:
        what = f"renamed from {line['renamed_from']}"
    return Change(str(line.get("time", "")), key, what, who, agent, fields)


class _Timeline:
    """The versions of one key, oldest first: kept ones, then the current entry."""

    def __init__(self, store: SessionStore, key: str, name: str) -> None:
        self.history, self.name, self.limit = store.history, name, store.max_entry_bytes
        self.kept = self.history.versions(name)
        self._read: dict[str, bytes] = {}  # each version is read once: before and after
        try:
            snap = store.read(key)
        except (EntryNotFound, OSError):
            self.current: tuple[float, bytes] | None = None
        else:
            self.current = (snap.stat.st_mtime, snap.data)

    def successor(self, i: int) -> bytes | None:
        """The bytes of the version that replaced ``kept[i]``, or None if it was removed."""
        kept, later = self.kept[i], i + 1
        while later < len(self.kept) and self.kept[later].stopped <= kept.stopped:
            later += 1  # (kept within the same millisecond)
        if later < len(self.kept):
            following = self.kept[later]
            if following.began - kept.stopped < REPLACED_WITHIN:
                return self.bytes_of(following)
            return None
        if self.current is not None and self.current[0] - kept.stopped < REPLACED_WITHIN:
            return self.current[1]
        return None

    def bytes_of(self, kept: Kept) -> bytes:
        if kept.name not in self._read:
            try:
                self._read[kept.name] = self.history.read(self.name, kept, self.limit)
            except OSError:
                self._read[kept.name] = b""
        return self._read[kept.name]


def _changed_fields(before: bytes, after: bytes) -> list[str]:
    try:
        old, new = orjson.loads(before), orjson.loads(after)
    except orjson.JSONDecodeError:
        return ["(not JSON)"]
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ["(not an object)"]
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
