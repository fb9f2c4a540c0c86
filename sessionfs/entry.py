"""What a valid session entry is.

Every commit to ``sessions.d/`` passes :func:`validate` first, so the gateway never
loads a file it would reject or silently drop.  The checks are the ones OpenClaw
relies on when it reads an entry back.
"""

from __future__ import annotations

import errno
import json
import re
import time
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
        entry = loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidEntry(f"not valid JSON: {exc}") from None
    check(entry)
    return entry  # type: ignore[no-any-return]


_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes) -> Any:
    """Parse JSON the way OpenClaw's Node.js does: lone surrogate escapes are kept.

    Node writes a string cut inside an emoji as ``"\\ud83d"``; orjson refuses such
    text, so it alone goes through the standard library's parser (with NaN and
    Infinity refused, as orjson and JSON do).  Raises ``orjson.JSONDecodeError``.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in str(exc):
            raise
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise orjson.JSONDecodeError(exc.msg, exc.doc, exc.pos) from None
    except ValueError as exc:  # invalid UTF-8, or NaN / Infinity
        raise orjson.JSONDecodeError(str(exc), "", 0) from None


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


def dumps(entry: object) -> bytes:
    """Serialize *entry* the way OpenClaw writes one: 2-space indent, no trailing newline.

    Strings holding lone surrogates (see :func:`loads`) are written as Node writes
    them, as ``\\uXXXX`` escapes, so nothing of them is lost.
    """
    try:
        return orjson.dumps(entry, option=orjson.OPT_INDENT_2)
    except orjson.JSONEncodeError as exc:
        if "surrogate" not in str(exc):
            raise
    text = json.dumps(entry, ensure_ascii=False, indent=2)
    return _LONE_SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()


def updated_at(entry: object) -> float | None:
    """The entry's ``updatedAt`` if it has a usable one (legacy entries may not)."""
    if isinstance(entry, dict):
        value = entry.get("updatedAt")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


PLAUSIBLE_FROM_MS = 946_684_800_000  # 2000-01-01: no OpenClaw session is older


def activity_ns(entry: object, now_ms: float | None = None) -> int | None:
    """The entry's ``updatedAt`` as a file's mtime in ns, if it is a plausible epoch-ms
    time (not before 2000, so not seconds; not in the future): migration and restore
    set it, so ``ls -lt`` sorts sessions by activity."""
    ms = updated_at(entry)
    now = time.time() * 1000 if now_ms is None else now_ms
    if ms is None or ms < PLAUSIBLE_FROM_MS or ms > now:
        return None
    return int(ms) * 1_000_000


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"
