"""Build SQLite-era state dirs for tests, from the schema facts (the tests own their data).

Only what sessionfs reads is modelled: ``schema_meta``, ``session_nodes``,
``session_windows`` and ``transcript_events`` of schema 23, in WAL mode, as
OpenClaw 2026.9.6 writes them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson

SCHEMA = """
CREATE TABLE schema_meta (
  meta_key TEXT PRIMARY KEY, role TEXT, schema_version INTEGER, agent_id TEXT,
  app_version TEXT, created_at INTEGER, updated_at INTEGER
);
CREATE TABLE session_nodes (
  session_key TEXT NOT NULL PRIMARY KEY,
  current_session_id TEXT NOT NULL,
  entry_json TEXT NOT NULL,
  entry_valid INTEGER NOT NULL DEFAULT 0,
  updated_at INTEGER NOT NULL
);
CREATE TABLE session_windows (
  session_id TEXT NOT NULL PRIMARY KEY,
  session_key TEXT NOT NULL,
  previous_session_id TEXT,
  reason TEXT,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE session_transcript_archives (
  session_id TEXT NOT NULL,
  generation TEXT NOT NULL,
  session_key TEXT NOT NULL,
  reason TEXT NOT NULL,
  encoding TEXT NOT NULL,
  archive_blob BLOB NOT NULL,
  archive_sha256 TEXT NOT NULL,
  archive_name TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  published_at INTEGER,
  PRIMARY KEY (session_id, generation)
);
CREATE TABLE transcript_events (
  session_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  event_json TEXT,
  created_at INTEGER NOT NULL,
  event_zstd BLOB,
  event_utf8_bytes INTEGER,
  navigation_json TEXT,
  PRIMARY KEY (session_id, seq)
);
"""


def database_of(state: Path, agent: str) -> Path:
    return state / "agents" / agent / "agent" / "openclaw-agent.sqlite"


def build_sqlite_state(
    state: Path, sessions: dict[str, dict[str, dict[str, object]]], *, schema: int = 23
) -> None:
    """*sessions*: agent -> key -> entry (with ``sessionId``); two events per session."""
    for agent, entries in sessions.items():
        path = database_of(state, agent)
        path.parent.mkdir(parents=True)
        db = sqlite3.connect(path)
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {schema}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(
            "INSERT INTO schema_meta VALUES ('primary', 'agent', ?, ?, '2026.9.6', 1, 1)",
            (schema, agent),
        )
        for key, entry in entries.items():
            put_session(db, key, entry)
        db.commit()
        db.close()


def put_session(db: sqlite3.Connection, key: str, entry: dict[str, object]) -> None:
    """Insert or replace one session as the gateway's entry writer does."""
    sid = str(entry["sessionId"])
    updated = int(entry.get("updatedAt", 1))  # type: ignore[call-overload]
    db.execute(
        "INSERT OR REPLACE INTO session_nodes VALUES (?, ?, ?, 1, ?)",
        (key, sid, orjson.dumps(entry).decode(), updated),
    )
    db.execute(
        "INSERT OR IGNORE INTO session_windows VALUES (?, ?, NULL, 'initial', 1, 1)", (sid, key)
    )
    for seq, event in enumerate(events_of(sid)):
        db.execute(
            "INSERT OR IGNORE INTO transcript_events (session_id, seq, event_json, created_at) "
            "VALUES (?, ?, ?, 1)",
            (sid, seq, event),
        )


def events_of(session_id: str) -> list[str]:
    return [
        orjson.dumps({"type": "session", "id": session_id}).decode(),
        orjson.dumps({"type": "message", "message": {"role": "user", "content": "hi"}}).decode(),
    ]
