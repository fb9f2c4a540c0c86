"""``sessionfs show``: a session's transcript for a person, and its earlier transcripts.

Every era is read the same way the mount reads it (a file's whole lines, or the
database's events), and nothing is written.  Rendering never drops an event: a
type it does not know is shown compactly, so new event types of new releases stay
visible.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from . import entry as entry_rules
from .errors import EntryNotFound, SessionFSError
from .legacy import LegacyView
from .migrate import BACKUP_PREFIX
from .sources import AgentStore, Era, Source, SourceKind
from .sqlite_view import SqliteView
from .store import SessionStore, read_small_file
from .transcripts import TranscriptFile, parsed, transcript_name

READ_CHUNK = 1 << 20
COMPACT_LIMIT = 300  # characters of an unknown event shown
MAX_BACKUP_BYTES = 512 * 1024 * 1024  # a backup larger than this is not looked in
ARCHIVE_STAMP_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d)-(\d\d)-(\d\d)(\.\d+)?Z$")
ARCHIVE_RE = re.compile(
    r"^(?P<name>.+\.jsonl)\.(?P<reason>reset|deleted|bak)\.(?P<when>.+?)(?:\.zst)?$"
)


class UsageError(SessionFSError):
    """A KEY or --agent that does not pick one session (exit status 2)."""


@dataclass(frozen=True)
class Earlier:
    """An earlier transcript of a session: a reset, rollover, archive."""

    what: str
    when: str
    size: int
    where: str


def find_agent(source: Source, key: str, agent_id: str | None) -> AgentStore:
    """The store that holds *key*: its own ``agent:<id>:`` part, else ``--agent``, else the
    only agent that has it."""
    stores = source.stores()
    if source.kind is not SourceKind.STATE_DIR:
        return stores[0]
    wanted = agent_id
    if wanted is None and key.startswith("agent:"):
        wanted = key.split(":", 2)[1]
    if wanted is not None:
        for store in stores:
            if store.agent_id == wanted:
                return store
        raise UsageError(f"no agent {wanted!r} under {source.path}")
    holders = [store for store in stores if _has_key(store, key)]
    if not holders:
        raise EntryNotFound(f"no session {key!r} under {source.path}")
    if len(holders) != 1:
        where = ", ".join(s.label for s in holders) or "no agent"
        raise UsageError(f"session {key!r} is in {where}; pick one with --agent ID")
    return holders[0]


def _has_key(agent: AgentStore, key: str) -> bool:
    try:
        _entry_of(agent, key)
    except EntryNotFound:
        return False
    return True


def _entry_of(agent: AgentStore, key: str) -> bytes:
    era = agent.era()
    if era is Era.SQLITE:
        view = SqliteView(agent.database)
        try:
            return view.read(key).data
        finally:
            view.close()
    if era is Era.DIRECTORY:
        with SessionStore(agent.entries, create=False) as store:
            return store.read(key).data
    if era is Era.JSON:
        return LegacyView(agent.legacy).read(key).data
    raise EntryNotFound(f"no session store in {agent.sessions_dir}")


def transcript_lines(agent: AgentStore, key: str) -> Iterator[bytes]:
    """The lines of *key*'s current transcript, each ending in a newline."""
    if agent.era() is Era.SQLITE:
        view = SqliteView(agent.database)
        try:
            session_id = view.session_id(key)
            if session_id is None:
                raise EntryNotFound(f"no session {key!r} in {agent.label}")
            after = -(2**63)
            while chunk := view.transcript_chunk(session_id, after, 16):  # (16 x 4 MiB at most)
                for _, line in chunk:
                    yield line
                after = chunk[-1][0]
        finally:
            view.close()
        return
    name = transcript_name(parsed(_entry_of(agent, key)), agent.sessions_dir)
    if name is None:
        raise EntryNotFound(f"session {key!r} names no transcript")
    with TranscriptFile(agent.sessions_dir, name) as transcript:
        offset, rest = 0, b""
        while data := transcript.read(offset, READ_CHUNK):
            offset += len(data)
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line + b"\n"


def earlier_transcripts(agent: AgentStore, key: str) -> list[Earlier]:
    """Resets, rollovers and archives of *key*'s transcripts, oldest first.

    JSON and directory eras keep no link from a key to its earlier ``sessionId``s
    but the older copies of its entry: every ``sessions.json.bak.*`` (OpenClaw's
    rotations, sessionfs's migrations) and a ``sessions.json`` beside ``sessions.d/``
    are looked in, and each earlier id's transcript and archives are listed.
    """
    if agent.era() is Era.SQLITE:
        return _earlier_in_database(agent, key)
    current = transcript_name(parsed(_entry_of(agent, key)), agent.sessions_dir)
    names = {current} if current is not None else set()
    earlier = _earlier_names(agent, key) - names
    found = []
    if agent.sessions_dir.is_dir():
        for dirent in os.scandir(agent.sessions_dir):
            if not dirent.is_file(follow_symlinks=False):
                continue
            match = ARCHIVE_RE.match(dirent.name)
            if match and match.group("name") in names | earlier:
                st = dirent.stat(follow_symlinks=False)
                found.append(
                    Earlier(
                        match.group("reason"), _stamp(match.group("when")), st.st_size, dirent.name
                    )
                )
            elif dirent.name in earlier:
                st = dirent.stat(follow_symlinks=False)
                when = dt.datetime.fromtimestamp(st.st_mtime, dt.UTC)
                found.append(
                    Earlier(
                        "earlier session",
                        when.isoformat(timespec="seconds"),
                        st.st_size,
                        dirent.name,
                    )
                )
    return sorted(found, key=lambda e: e.when)


def _earlier_names(agent: AgentStore, key: str) -> set[str]:
    """Transcript names *key*'s entry had in the older copies of the store."""
    copies = sorted(agent.sessions_dir.glob(f"{BACKUP_PREFIX}*"))
    if agent.era() is Era.DIRECTORY:
        copies.append(agent.legacy)  # (a gateway that never read sessions.d/)
    names = set()
    for copy in copies:
        with contextlib.suppress(OSError, ValueError, SessionFSError):
            data = read_small_file(copy, limit=MAX_BACKUP_BYTES)  # no FIFO, no symlink
            if data is None:
                continue
            store = entry_rules.loads(data)
            if isinstance(store, dict):
                name = transcript_name(store.get(key), agent.sessions_dir)
                if name is not None:
                    names.add(name)
    return names


def _earlier_in_database(agent: AgentStore, key: str) -> list[Earlier]:
    view = SqliteView(agent.database)
    try:
        rows = view._query(
            lambda c: c.execute(
                "SELECT w.session_id, w.reason, w.created_at, "
                "(SELECT COALESCE(SUM(COALESCE(length(CAST(e.event_json AS BLOB)), "
                "e.event_utf8_bytes, 0) + 1), 0) "
                " FROM transcript_events e WHERE e.session_id = w.session_id) "
                "FROM session_windows w WHERE w.session_key = ? ORDER BY w.created_at",
                (key,),
            ).fetchall()
        )
        current = view.session_id(key)
        archives: list[tuple[str, str, int, int]] = []
        with contextlib.suppress(SessionFSError):  # a schema without archives
            archives = view._query(
                lambda c: c.execute(
                    "SELECT a.archive_name, a.reason, a.created_at, length(a.archive_blob) "
                    "FROM session_transcript_archives a JOIN session_windows w "
                    "ON w.session_id = a.session_id WHERE w.session_key = ?",
                    (key,),
                ).fetchall()
            )
    finally:
        view.close()
    found = [
        Earlier(f"generation ({reason or 'initial'})", _iso(at), size, session_id)
        for session_id, reason, at, size in rows
        if session_id != current
    ]
    found += [
        Earlier(f"archive ({reason})", _iso(at), size, name) for name, reason, at, size in archives
    ]
    return sorted(found, key=lambda e: e.when)


def _iso(epoch_ms: float | None) -> str:
    """One format for every time in the history, so that they sort as times."""
    if not epoch_ms:
        return "?"
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(when: str) -> str:
    """An archive name's time (``2026-09-01T00-00-00.000Z``, or epoch ms) as :func:`_iso`."""
    match = ARCHIVE_STAMP_RE.match(when)
    if match:
        return f"{match.group(1)}:{match.group(2)}:{match.group(3)}Z"
    if when.isdigit():
        return _iso(int(when))
    return when


# -- rendering ----------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """How a turn is drawn: Markdown, or text with (or without) colour."""

    markdown: bool
    colour: bool = False

    def heading(self, role: str, when: str | None) -> str:
        stamp = f" · {when}" if when else ""
        if self.markdown:
            return f"## {role}{stamp}"
        colours = {"user": "36", "assistant": "32", "tool": "33"}
        if self.colour:
            return f"\x1b[1;{colours.get(role, '35')}m{role}\x1b[0m{stamp}"
        return f"{role}{stamp}"

    def folded(self, summary: str, body: str) -> str:
        if self.markdown:
            return f"<details><summary>{summary}</summary>\n\n```\n{body}\n```\n\n</details>"
        return f"  [{summary}] {body[:COMPACT_LIMIT]}"


def render(lines: Iterator[bytes], fmt: str, *, colour: bool = False) -> Iterator[str]:
    """The transcript as text: ``jsonl`` (as stored), ``md`` or ``text``."""
    if fmt == "jsonl":
        for line in lines:
            yield line.decode("utf-8", "backslashreplace")
        return
    style = Style(markdown=fmt == "md", colour=colour)
    for line in lines:
        yield from _event(line, style)


def _event(line: bytes, style: Style) -> Iterator[str]:
    try:
        event = entry_rules.loads(line)
    except ValueError:
        yield f"(unreadable line: {line[:COMPACT_LIMIT].decode('utf-8', 'replace')!r})\n\n"
        return
    if not isinstance(event, dict):
        yield _compact(event, style) + "\n\n"
        return
    kind = event.get("type")
    when = event.get("timestamp") if isinstance(event.get("timestamp"), str) else None
    if kind == "session":
        title = f"Session {event.get('id', '?')}"
        yield (f"# {title}" if style.markdown else title) + (f" · {when}" if when else "")
        yield "\n\n"
        return
    message = event.get("message")
    if kind == "message" and isinstance(message, dict):
        role = str(message.get("role", "?"))
        shown_role = "tool" if role == "toolResult" else role
        yield style.heading(shown_role, when) + "\n\n"
        body = _content(message.get("content"), style, tool_result=role == "toolResult")
        yield body + "\n\n"
        return
    yield _compact(event, style) + "\n\n"


def _content(content: object, style: Style, *, tool_result: bool) -> str:
    if isinstance(content, str):
        return style.folded("tool result", content) if tool_result else content
    if not isinstance(content, list):
        return _compact(content, style)
    parts = []
    for part in content:
        if not isinstance(part, dict):
            parts.append(_compact(part, style))
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            text = part["text"]
            parts.append(style.folded("tool result", text) if tool_result else text)
        elif kind in ("toolCall", "tool_use", "toolUse"):
            name = part.get("name", "?")
            arguments = part.get("arguments", part.get("input"))
            body = _json(arguments, indent=True)
            parts.append(style.folded(f"tool call: {name}", body))
        elif kind in ("toolResult", "tool_result"):
            body = _json(part.get("content"), indent=True)
            parts.append(style.folded("tool result", body))
        else:
            parts.append(_compact(part, style))
    return "\n\n".join(parts)


def _json(value: object, *, indent: bool) -> str:
    """JSON for a person; what orjson refuses (lone surrogates, deep nesting) still shows."""
    try:
        return orjson.dumps(
            value, default=str, option=orjson.OPT_INDENT_2 if indent else 0
        ).decode()
    except (TypeError, orjson.JSONEncodeError):
        try:
            return json.dumps(value, ensure_ascii=True, indent=2 if indent else None, default=str)
        except (ValueError, RecursionError):
            return repr(value)[:COMPACT_LIMIT]


def _compact(value: object, style: Style) -> str:
    text = _json(value, indent=False)
    if len(text) > COMPACT_LIMIT:
        text = text[:COMPACT_LIMIT] + "…"
    kind = value.get("type") if isinstance(value, dict) else type(value).__name__
    return f"- _{kind}_: `{text}`" if style.markdown else f"  ({kind}) {text}"


def show(
    source: Source, key: str, *, agent_id: str | None, fmt: str, colour: bool
) -> Iterator[str]:
    """What ``sessionfs show`` prints."""
    agent = find_agent(source, key, agent_id)
    yield from render(transcript_lines(agent, key), fmt, colour=colour)


def history(source: Source, key: str, *, agent_id: str | None) -> list[str]:
    agent = find_agent(source, key, agent_id)
    earlier = earlier_transcripts(agent, key)
    if not earlier:
        return [f"{key}: no earlier transcripts"]
    return [f"{e.when}  {e.what:<24} {e.size:>10} bytes  {e.where}" for e in earlier]


__all__ = ["UsageError", "history", "show"]
