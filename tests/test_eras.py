"""Each agent's era, decided in one place, and what every command does with it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from sessionfs import sources
from sessionfs.cli import main as cli
from sessionfs.sources import Era
from sessionfs.store import SessionStore
from tests.helpers import entry, entry_bytes
from tests.sqlite_state import build_sqlite_state


def legacy(sessions_dir: Path, keys: list[str]) -> None:
    sessions_dir.mkdir(parents=True, exist_ok=True)
    store = {key: entry(f"s-{i}") for i, key in enumerate(keys)}
    (sessions_dir / "sessions.json").write_bytes(orjson.dumps(store, option=orjson.OPT_INDENT_2))


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """One agent of each era, and the leftovers real state dirs hold."""
    state = tmp_path / "state"
    agents = state / "agents"
    legacy(agents / "jsonera" / "sessions", ["agent:jsonera:main"])
    (agents / "direra" / "sessions").mkdir(parents=True)
    with SessionStore(agents / "direra" / "sessions" / "sessions.d") as store:
        store.write("agent:direra:main", entry_bytes("s-d"))
    build_sqlite_state(
        state,
        {
            "sqlera": {"agent:sqlera:main": entry("s-q")},
            "leftover": {"agent:leftover:main": entry("s-l")},
            "upgraded": {"agent:upgraded:main": entry("s-u")},
        },
    )
    legacy(agents / "leftover" / "sessions", ["agent:leftover:old"])  # import input
    (agents / "upgraded" / "sessions").mkdir(parents=True, exist_ok=True)
    with SessionStore(agents / "upgraded" / "sessions" / "sessions.d") as store:
        store.write("agent:upgraded:old", entry_bytes("s-o"))
    (agents / "empty" / "sessions").mkdir(parents=True)
    return state


def eras(state: Path) -> dict[str, Era]:
    return {agent.label: agent.era() for agent in sources.resolve(state).stores()}


def test_each_agent_has_one_era(mixed: Path) -> None:
    assert eras(mixed) == {
        "direra": Era.DIRECTORY,
        "empty": Era.NONE,
        "jsonera": Era.JSON,
        "leftover": Era.SQLITE,  # a database wins: its sessions.json is import input
        "sqlera": Era.SQLITE,
        "upgraded": Era.SQLITE,  # migrated by sessionfs, then upgraded
    }


def lines_of(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    cli(list(argv))
    out = capsys.readouterr().out
    return {line.split(":", 1)[0]: line for line in out.splitlines() if not line.startswith(" ")}


def test_migrate_says_one_line_per_agent_and_never_touches_sqlite_agents(
    mixed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leftover = (mixed / "agents/leftover/sessions/sessions.json").read_bytes()
    lines = lines_of(capsys, "migrate", str(mixed))
    assert set(lines) == {"direra", "empty", "jsonera", "leftover", "sqlera", "upgraded"}
    assert "migrated 1 entries" in lines["jsonera"]
    for agent in ("leftover", "sqlera", "upgraded"):
        assert "SQLite era" in lines[agent]
        assert "never migrated" in lines[agent]
    assert (mixed / "agents/leftover/sessions/sessions.json").read_bytes() == leftover
    assert not (mixed / "agents/leftover/sessions/sessions.d").exists()


def test_maintain_says_why_it_leaves_an_agent_alone(
    mixed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(capsys, "maintain", str(mixed), "--dry-run")
    assert "not maintained" not in lines["direra"]  # the one era maintenance is for
    assert "not maintained: JSON era" in lines["jsonera"]
    for agent in ("leftover", "sqlera", "upgraded"):
        assert "not maintained: SQLite era" in lines[agent]


def test_ls_lists_every_era_from_its_own_store(
    mixed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["ls", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "upgraded: 1 sessions (SQLite era, read-only" in out
    assert "agent:upgraded:main " in out  # the database, not the old sessions.d/
    assert "jsonera: 1 sessions (JSON era, sessions.json, not migrated)" in out
    assert "direra: 1 sessions (directory era, sessions.d/, read-write" in out
    assert "empty: 0 sessions (no store" in out


def test_ls_as_json_sorted_and_limited(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ls", str(mixed), "--json", "--sort", "key"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["agent"], r["key"]) for r in rows] == sorted((r["agent"], r["key"]) for r in rows)
    assert {r["agent"] for r in rows} == {"direra", "jsonera", "leftover", "sqlera", "upgraded"}
    assert all({"key", "agent", "sessionId", "updatedAt"} <= set(r) for r in rows)
    assert cli(["ls", str(mixed), "--json", "--agent", "direra", "--limit", "1"]) == 0
    (only,) = capsys.readouterr().out.splitlines()
    assert orjson.loads(only)["key"] == "agent:direra:main"


def test_ls_table_is_newest_first_with_relative_times() -> None:
    from sessionfs.listing import Row, relative, sorted_rows, table

    now = 1_800_000_000.0
    rows = [
        Row("cron:old", "main", {"updatedAt": (now - 7200) * 1000, "model": "m"}),
        Row("cron:new", "main", {"updatedAt": (now - 180) * 1000, "inputTokens": 5}),
    ]
    lines = table(sorted_rows(rows, "updated"), now=now)
    assert lines[0].split() == ["KEY", "AGENT", "UPDATED", "CHANNEL", "MODEL", "TOKENS"]
    assert lines[1].startswith("cron:new")
    assert "3 min ago" in lines[1]
    assert lines[1].endswith("5")
    assert "2 h ago" in lines[2]
    assert relative(None, now) == "-"


def test_ls_shows_what_keys_and_entries_hold_without_letting_them_forge_output() -> None:
    from sessionfs.listing import Row, json_lines, table, width

    now = 1_800_000_000.0
    forged = "agent:main:evil\nFAKE  main  1 s ago"
    rows = [
        Row(forged, "main", {"updatedAt": now * 1000, "model": "\x1b]0;pwned\x07"}),
        Row("agent:main:webchat:direct:東京", "main", {"updatedAt": now * 1000, "model": "m"}),
        Row("cron:flag", "main", {"updatedAt": now * 1000, "totalTokens": True}),
    ]
    lines = table(rows, now=now)
    assert len(lines) == 4  # a header and one line per session: no forged row
    assert "agent:main:evil\\nFAKE" in lines[1]
    assert "\x1b" not in "".join(lines)
    assert "\\x1b]0;pwned\\x07" in lines[1]
    # the wide key takes two columns a character: the AGENT column lines up after it
    agent_columns = {width(line[: line.rindex(" main ") + 1]) for line in lines[1:]}
    assert len(agent_columns) == 1
    assert width("東京") == 4
    assert lines[3].rstrip().endswith("-")  # true is no token count
    spoofed = Row("agent:main:real", "main", {"key": "spoofed", "agent": "x", "sessionId": "s"})
    (line,) = json_lines([spoofed])
    assert orjson.loads(line) == {"key": "agent:main:real", "agent": "main", "sessionId": "s"}


def test_ls_refuses_what_it_cannot_honour(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["ls", str(mixed), "--limit", "-1"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        cli(["ls", str(mixed), "--agent", "nope"])
    assert exited.value.code == 2
    assert "no agent 'nope'" in capsys.readouterr().err


def test_ls_into_a_pipe_closed_early_is_no_error(tmp_path: Path) -> None:
    """`sessionfs ls | head -1` under `set -o pipefail`: the reader leaving is not a failure."""
    import subprocess
    import sys

    from sessionfs.demo import write_legacy_store

    write_legacy_store(tmp_path / "sessions", "main", 2000, transcripts=False)  # > a pipe's 64 KiB
    result = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            '"$0" -m sessionfs ls "$1" | head -1',
            sys.executable,
            str(tmp_path / "sessions"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.endswith(": 2000 sessions (JSON era, sessions.json, not migrated)\n")


@pytest.mark.parametrize(
    ("text", "columns"),
    [
        ("agent:main:x", 12),
        ("東京", 4),  # wide
        ("e\u0301", 1),  # a combining accent
        ("👨\u200d👩\u200d👧", 2),  # one picture of three joined emoji
        ("❤\ufe0f", 2),  # drawn as an emoji
        ("\u1100\u1161", 2),  # conjoining jamo: one syllable
        ("a\u00adb", 3),  # a soft hyphen is drawn
    ],
)
def test_ls_counts_columns_as_terminals_draw_them(text: str, columns: int) -> None:
    from sessionfs.listing import width

    assert width(text) == columns
