"""What a valid session entry is.

Every commit to ``sessions.d/`` passes :func:`validate` first, so the gateway never
loads a file it would reject or silently drop.  The checks are the ones OpenClaw
relies on when it reads an entry back.
"""

from __future__ import annotations

import errno
import re
from typing import Any

import orjson

from .errors import InvalidEntry

DEFAULT_MAX_ENTRY_BYTES = 16 * 1024 * 1024

# OpenClaw's own rule; transcripts are named after the id, so it must never
# hold a path separator or start with a dot.
SESSION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$", re.IGNORECASE)

Entry = dict[str, Any]


def validate(data: bytes, max_bytes: int = DEFAULT_MAX_ENTRY_BYTES) -> Entry:
    """Parse *data* into an entry, or raise :class:`InvalidEntry` saying which rule failed."""
    if len(data) > max_bytes:
        raise InvalidEntry(
            f"entry is {len(data)} bytes; the limit is {max_bytes}", code=errno.EFBIG
        )
    if not data.strip():
        raise InvalidEntry("entry is empty")
    try:
        entry = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidEntry(f"not valid JSON: {exc}") from None
    check(entry)
    return entry  # type: ignore[no-any-return]


def check(entry: object) -> None:
    """Check an already parsed entry (see :func:`validate`)."""
    if not isinstance(entry, dict):
        raise InvalidEntry(f"entry must be a JSON object, not {_json_type(entry)}")
    session_id = entry.get("sessionId")
    if not isinstance(session_id, str):
        raise InvalidEntry('entry needs a string "sessionId"')
    if not SESSION_ID_RE.match(session_id):
        raise InvalidEntry(
            f'"sessionId" {session_id!r} must match {SESSION_ID_RE.pattern} (case-insensitive)'
        )
    updated_at = entry.get("updatedAt")
    if isinstance(updated_at, bool) or not isinstance(updated_at, int | float):
        raise InvalidEntry('entry needs a numeric "updatedAt" (epoch milliseconds)')


def dumps(entry: Entry) -> bytes:
    """Serialize *entry* the way OpenClaw writes one: 2-space indent, no trailing newline."""
    return orjson.dumps(entry, option=orjson.OPT_INDENT_2)


def updated_at(entry: object) -> float | None:
    """The entry's ``updatedAt`` if it has a usable one (legacy entries may not)."""
    if isinstance(entry, dict):
        value = entry.get("updatedAt")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"
