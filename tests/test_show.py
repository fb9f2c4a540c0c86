"""`sessionfs show`: a transcript for a person, every era, nothing dropped, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from sessionfs import sources
from sessionfs.migrate import migrate_source
from sessionfs.show import render
from tests.mounting import sessionfs
from tests.sqlite_state import build_sqlite_state

KEY = "agent:main:main"
EVENTS = [
    {"type": "session", "id": "s1", "timestamp": "2026-11-01T10:00:00.000Z"},
    {"type": "message", "message": {"role": "user", "content": "What is 2+2?"}},
    {
        "type": "message",
        "timestamp": "2026-11-01T10:00:05.000Z",
        "message": {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute."},
                {"type": "toolCall", "name": "calc", "arguments": {"expr": "2+2"}},
            ],
        },
    },
    {
        "type": "message",
        "message": {"role": "toolResult", "content": [{"type": "text", "text": "4"}]},
    },
    {"type": "compaction", "summary": "a brand-new event type"},
]


def lines() -> list[bytes]:
    return [orjson.dumps(e) + b"\n" for e in EVENTS]


def test_markdown_has_turns_folded_tools_and_unknown_events() -> None:
    text = "".join(render(iter(lines()), "md"))
    assert "# Session s1 · 2026-11-01T10:00:00.000Z" in text
    assert "## user\n\nWhat is 2+2?" in text
    assert "## assistant · 2026-11-01T10:00:05.000Z" in text
    assert "<details><summary>tool call: calc</summary>" in text
    assert '"expr": "2+2"' in text
    assert "## tool" in text
    assert "<details><summary>tool result</summary>" in text
    assert "- _compaction_:" in text  # unknown types are shown, never dropped
    assert "a brand-new event type" in text


def test_text_and_raw_lines() -> None:
    text = "".join(render(iter(lines()), "text", colour=True))
    assert "\x1b[1;36muser\x1b[0m" in text
    assert "(compaction)" in text
    assert "".join(render(iter(lines()), "jsonl")).encode() == b"".join(lines())


def test_show_reads_every_era(state_dir: Path, tmp_path: Path) -> None:
    json_era = sessionfs("show", str(state_dir), KEY)
    assert json_era.returncode == 0, json_era.stderr
    assert "## user\n\nhi" in json_era.stdout  # not a terminal: Markdown
    migrate_source(sources.resolve(state_dir), progress=None)
    directory_era = sessionfs("show", str(state_dir), KEY, "--format", "jsonl")
    sid = orjson.loads(
        (state_dir / "agents/main/sessions/sessions.d/agent%3Amain%3Amain.json").read_bytes()
    )["sessionId"]
    transcript = state_dir / f"agents/main/sessions/{sid}.jsonl"
    assert directory_era.stdout == transcript.read_text()
    sqlite = tmp_path / "sqlite"
    build_sqlite_state(sqlite, {"main": {KEY: {"sessionId": "s-main", "updatedAt": 1}}})
    from_db = sessionfs("show", str(sqlite), KEY, "--format", "jsonl")
    assert from_db.returncode == 0, from_db.stderr
    assert '{"type":"session","id":"s-main"}' in from_db.stdout


def test_history_lists_earlier_transcripts(state_dir: Path) -> None:
    migrate_source(sources.resolve(state_dir), progress=None)
    sid = orjson.loads(
        (state_dir / "agents/main/sessions/sessions.d/agent%3Amain%3Amain.json").read_bytes()
    )["sessionId"]
    sessions = state_dir / "agents/main/sessions"
    (sessions / f"{sid}.jsonl.reset.2026-10-01T00-00-00.000Z").write_text("{}\n")
    result = sessionfs("show", str(state_dir), KEY, "--history")
    assert result.returncode == 0
    assert "2026-10-01T00:00:00Z  reset" in result.stdout


def test_history_finds_earlier_session_ids_in_older_copies_of_the_store(
    state_dir: Path,
) -> None:
    """After a reset the entry names a new sessionId; the old one is in the backups."""
    sessions = state_dir / "agents/main/sessions"
    store = orjson.loads((sessions / "sessions.json").read_bytes())
    older = {**store, KEY: {**store[KEY], "sessionId": "s-before-reset"}}
    (sessions / "sessions.json.bak.1700000000000").write_bytes(orjson.dumps(older))
    (sessions / "s-before-reset.jsonl.reset.2026-09-01T00-00-00.000Z").write_text("{}\n{}\n")
    (sessions / "s-before-reset.jsonl.deleted.2026-09-02T00-00-00.000Z.zst").write_bytes(b"z")
    migrate_source(sources.resolve(state_dir), progress=None)  # (history survives it)
    result = sessionfs("show", str(state_dir), KEY, "--history")
    assert result.returncode == 0, result.stderr
    assert "2026-09-01T00:00:00Z  reset" in result.stdout
    assert "s-before-reset.jsonl.reset.2026-09-01T00-00-00.000Z" in result.stdout
    assert "2026-09-02T00:00:00Z  deleted" in result.stdout
    lines = result.stdout.splitlines()
    assert lines == sorted(lines)  # oldest first, whatever the source of each time


def test_keys_without_an_agent_part_and_missing_ones(state_dir: Path) -> None:
    missing = sessionfs("show", str(state_dir), "cron:nope")
    assert missing.returncode == 1
    assert "no session 'cron:nope'" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert sessionfs("show", str(state_dir), "agent:ghost:x").returncode == 2


def test_what_orjson_refuses_is_still_shown() -> None:
    deep: object = "bottom"
    for _ in range(300):
        deep = [deep]
    odd = [
        b'{"type":"weird","s":"\\ud83d"}\n',
        json.dumps({"type": "nested", "v": deep}).encode() + b"\n",
    ]
    for fmt in ("md", "text"):
        text = "".join(render(iter(odd), fmt))
        assert "weird" in text
        assert "nested" in text
