"""``sessionfs ls``: the sessions of every era as a table, or as JSON lines.

Each agent is read from the store its era says (:func:`~.export.era_entries`), so a
SQLite-era agent lists its database and a JSON-era one its ``sessions.json``.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import Any

import orjson

from . import entry as entry_rules
from .errors import SessionFSError
from .export import era_entries
from .shell import printable
from .sources import AgentStore, Era, Source
from .sqlite_view import SqliteView

ERA_ACCESS = {
    Era.SQLITE: "read-only: OpenClaw's database",
    Era.DIRECTORY: "sessions.d/, read-write through a mount",
    Era.JSON: "sessions.json, not migrated",
    Era.NONE: "nothing here yet",
}
SORTS = ("updated", "key", "tokens")


@dataclass(frozen=True)
class Row:
    """One session as ``ls`` shows it; *entry* is the whole entry (``--json``)."""

    key: str
    agent: str
    entry: dict[str, Any]

    @property
    def updated_at(self) -> float | None:
        return entry_rules.updated_at(self.entry)

    @property
    def tokens(self) -> int | None:
        total = _count(self.entry.get("totalTokens"))
        if total is not None:
            return total
        parts = [_count(self.entry.get(k)) for k in ("inputTokens", "outputTokens")]
        numbers = [p for p in parts if p is not None]
        return sum(numbers) if numbers else None

    def field(self, name: str) -> str:
        value = self.entry.get(name)
        return value if isinstance(value, str) else "-"


def _count(value: object) -> int | None:
    """*value* if it is a count (a JSON true is no number of tokens)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class Listing:
    rows: list[Row]
    summaries: list[str]  # one line per agent: its era and how many sessions
    problems: list[str]


def list_source(source: Source, *, agent_id: str | None = None) -> Listing:
    out = Listing([], [], [])
    for agent in source.stores():
        label = agent.owner or agent.label
        if agent_id is not None and label != agent_id:
            continue
        era = agent.era()
        count = 0
        with era_entries(agent) as entries:
            if entries is not None:
                if isinstance(entries, SqliteView) and entries.problem is not None:
                    out.problems.append(f"{agent.label}: {entries.problem}")
                for key in sorted(entries.keys()):
                    try:
                        value = entry_rules.loads(entries.read(key).data)
                    except (SessionFSError, OSError, ValueError) as exc:
                        out.problems.append(f"{agent.label}: {key!r} not read: {exc}")
                        continue
                    if not isinstance(value, dict):
                        out.problems.append(f"{agent.label}: {key!r} is not a JSON object")
                        continue
                    count += 1
                    out.rows.append(Row(key, label, value))
        out.summaries.append(f"{agent.label}: {count} sessions ({era.value}, {ERA_ACCESS[era]})")
    out.problems += [f"{name}: skipped: {why}" for name, why in source.skipped]
    return out


def sorted_rows(rows: list[Row], by: str) -> list[Row]:
    if by == "key":
        return sorted(rows, key=lambda r: (r.agent, r.key))
    if by == "tokens":
        return sorted(rows, key=lambda r: (r.tokens is None, -(r.tokens or 0), r.key))
    return sorted(rows, key=lambda r: (r.updated_at is None, -(r.updated_at or 0), r.key))


def relative(epoch_ms: float | None, now: float) -> str:
    """``3 min ago``: how long ago, in the largest unit that fits."""
    if epoch_ms is None:
        return "-"
    seconds = now - epoch_ms / 1000
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def table(rows: list[Row], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    header = ("KEY", "AGENT", "UPDATED", "CHANNEL", "MODEL", "TOKENS")
    cells = [
        (
            r.key,
            r.agent,
            relative(r.updated_at, now),
            r.field("lastChannel"),
            r.field("model"),
            "-" if r.tokens is None else f"{r.tokens:,}",
        )
        for r in rows
    ]
    return columns(header, cells, numeric={len(header) - 1})


def columns(
    header: Sequence[str], cells: Sequence[Sequence[str]], *, numeric: Set[int] = frozenset()
) -> list[str]:
    """Aligned text columns under *header*; the *numeric* ones right-aligned.

    Cells come from keys and entries anyone may have written: control characters
    are shown escaped (a newline or an escape sequence in a key must not forge a
    row or drive the terminal), and wide characters count as two columns.
    """
    rows = [[printable(cell) for cell in row] for row in [header, *cells]]
    widths = [[width(cell) for cell in row] for row in rows]
    most = [max(row[i] for row in widths) for i in range(len(header))]
    lines = []
    for row, row_widths in zip(rows, widths, strict=True):
        padded = [
            " " * (most[i] - w) + cell if i in numeric else cell + " " * (most[i] - w)
            for i, (cell, w) in enumerate(zip(row, row_widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return lines


def width(text: str) -> int:
    """How many terminal columns *text* takes, as terminals draw it: East Asian wide
    characters and emoji two, combining marks none, an emoji sequence joined by
    U+200D one picture, U+FE0F an emoji's two columns."""
    if text.isascii():
        return len(text)
    total, previous, joined = 0, 0, False
    for c in text:
        if c == _JOINER:
            joined = True
            continue
        if c == _EMOJI_PRESENTATION:
            total += 2 - previous  # (the character before it is drawn as an emoji)
            previous = 2
            continue
        if joined:  # part of the picture already counted
            joined = False
            continue
        if c == _SOFT_HYPHEN:
            columns = 1
        elif unicodedata.category(c) in _ZERO_WIDTH or _HANGUL_VOWELS <= ord(c) <= _HANGUL_END:
            columns = 0
        else:
            columns = 2 if unicodedata.east_asian_width(c) in "WF" else 1
        total += columns
        previous = columns
    return total


_ZERO_WIDTH = frozenset({"Mn", "Me", "Cf"})  # marks and format characters
_JOINER, _EMOJI_PRESENTATION, _SOFT_HYPHEN = "\u200d", "\ufe0f", "\u00ad"
_HANGUL_VOWELS, _HANGUL_END = 0x1160, 0x11FF  # conjoining jamo: drawn into the syllable


def count_sessions(agent: AgentStore) -> int | None:
    """How many sessions *agent* holds in its era's store, without reading them."""
    with era_entries(agent) as entries:
        if entries is None:
            return None
        keys = entries.keys()  # a generator for sessions.d/: never a list of 100,000
        return sum(1 for _key in keys)


def json_lines(rows: list[Row]) -> list[bytes]:
    """One object per session: ``key``, ``agent``, then the entry's top-level fields."""
    out = []
    for r in rows:
        # key and agent are the session's, whatever fields of those names the entry holds
        value = {"key": r.key, "agent": r.agent}
        value.update((k, v) for k, v in r.entry.items() if k not in value)
        try:
            out.append(orjson.dumps(value))
        except orjson.JSONEncodeError:  # lone surrogates: escaped, as Node writes them
            out.append(json.dumps(value).encode())
    return out
