"""Small builders shared by the tests."""

from __future__ import annotations

import orjson


def entry(
    session_id: str = "s1", updated_at: int = 1_700_000_000_000, **fields: object
) -> dict[str, object]:
    return {"sessionId": session_id, "updatedAt": updated_at, **fields}


def entry_bytes(
    session_id: str = "s1", updated_at: int = 1_700_000_000_000, **fields: object
) -> bytes:
    return orjson.dumps(entry(session_id, updated_at, **fields), option=orjson.OPT_INDENT_2)
