"""`sessionfs export`: the sessions of every era as one JSON document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from sessionfs.cli import main as cli
from sessionfs.store import SessionStore
from tests.helpers import entry, entry_bytes
from tests.sqlite_state import build_sqlite_state

JSON_ERA = {"cron:j": entry("s-j", 1), "agent:json:main": entry("s-jm", 2, x="ü")}
DIR_ERA = {"cron:d": entry("s-d", 3), "agent:dir:main": entry("s-dm", 4)}
SQLITE_ERA = {"agent:sql:main": entry("s-sm", 5), "cron:s": entry("s-s", 6)}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state dir with one agent of each era."""
    state = tmp_path / "state"
    json_dir = state / "agents" / "json" / "sessions"
    json_dir.mkdir(parents=True)
    (json_dir / "sessions.json").write_bytes(orjson.dumps(JSON_ERA, option=orjson.OPT_INDENT_2))
    (state / "agents" / "dir" / "sessions").mkdir(parents=True)
    with SessionStore(state / "agents" / "dir" / "sessions" / "sessions.d") as store:
        for key, value in DIR_ERA.items():
            store.write(key, orjson.dumps(value, option=orjson.OPT_INDENT_2))
    build_sqlite_state(state, {"sql": SQLITE_ERA})
    return state


def export(capsysbinary: pytest.CaptureFixture[bytes], *args: str) -> tuple[int, Any, str]:
    code = cli(["export", *args])
    captured = capsysbinary.readouterr()
    return code, orjson.loads(captured.out or b"null"), captured.err.decode()


def test_a_state_dir_exports_every_agent_of_every_era(
    state: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, document, err = export(capsysbinary, str(state))
    assert code == 0, err
    assert document == {"dir": DIR_ERA, "json": JSON_ERA, "sql": SQLITE_ERA}


@pytest.mark.parametrize(("agent", "expected"), [("json", JSON_ERA), ("sql", SQLITE_ERA)])
def test_one_agent_is_the_shape_of_sessions_json(
    state: Path, capsysbinary: pytest.CaptureFixture[bytes], agent: str, expected: Any
) -> None:
    code, document, _ = export(capsysbinary, str(state), "--agent", agent)
    assert code == 0
    assert document == expected


def test_a_sessions_dir_exports_flat_to_a_file(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.json"
    assert cli(["export", str(state / "agents" / "dir" / "sessions"), "-o", str(out)]) == 0
    assert orjson.loads(out.read_bytes()) == DIR_ERA
    assert out.stat().st_mode & 0o777 == 0o600


def test_an_upgraded_agent_exports_its_database_or_its_old_sessions_d(
    state: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    old = state / "agents" / "sql" / "sessions" / "sessions.d"
    old.parent.mkdir(exist_ok=True)
    with SessionStore(old) as store:  # migrated by sessionfs, then upgraded to SQLite
        store.write("cron:old", entry_bytes("s-old", 1))
    code, document, err = export(capsysbinary, str(state), "--agent", "sql")
    assert (code, document) == (0, SQLITE_ERA)
    assert "--sessions-d exports that instead" in err
    code, document, _ = export(capsysbinary, str(state), "--agent", "sql", "--sessions-d")
    assert (code, document) == (0, {"cron:old": entry("s-old", 1)})


def test_an_unknown_schema_is_reported_not_exported_as_empty_silently(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    build_sqlite_state(tmp_path / "s", {"main": SQLITE_ERA}, schema=99)
    code, document, err = export(capsysbinary, str(tmp_path / "s"))
    assert code == 1
    assert document == {"main": {}}
    assert "schema 99" in err


def test_an_unknown_agent_is_an_error(
    state: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert cli(["export", str(state), "--agent", "nope"]) == 1
    assert "no agent 'nope'" in capsysbinary.readouterr().err.decode()


def test_a_corrupt_database_is_named_and_the_others_exported(
    state: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    (state / "agents" / "sql" / "agent" / "openclaw-agent.sqlite").write_bytes(b"not sqlite" * 100)
    code, document, err = export(capsysbinary, str(state))
    assert code == 1
    assert document["json"] == JSON_ERA
    assert document["sql"] == {}
    assert "sql: not exported" in err


def test_a_named_sessions_d_of_an_upgraded_agent_is_what_is_exported(
    state: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    old = state / "agents" / "sql" / "sessions" / "sessions.d"
    old.parent.mkdir(exist_ok=True)
    with SessionStore(old) as store:
        store.write("cron:old", entry_bytes("s-old", 1))
    code, document, _ = export(capsysbinary, str(old))
    assert (code, document) == (0, {"cron:old": entry("s-old", 1)})
