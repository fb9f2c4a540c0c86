"""Compare a mount of a SQLite-era state dir with OpenClaw's own view (scripts/check-openclaw).

Prints one line per mismatch and a summary; exit 0 when every session OpenClaw lists
is a file in the mount whose entry equals the database row and whose transcript
equals the database's events, 1 otherwise.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from sessionfs.daemon import is_mounted
from sessionfs.keys import key_to_display

REPO = Path(__file__).resolve().parent.parent


def listed_by_openclaw(path: Path) -> dict[str, set[str]]:
    """agent -> keys, from `openclaw sessions list --all-agents --json`."""
    value: Any = orjson.loads(path.read_bytes())
    rows = value.get("sessions", value) if isinstance(value, dict) else value
    found: dict[str, set[str]] = {}
    for row in rows:
        key = row.get("key") or row.get("sessionKey")
        agent = row.get("agentId") or (key.split(":")[1] if key.startswith("agent:") else "main")
        found.setdefault(agent, set()).add(key)
    return found


def main() -> int:
    state, listing = Path(sys.argv[1]), Path(sys.argv[2])
    expected = listed_by_openclaw(listing)
    problems: list[str] = []
    checked = 0
    with tempfile.TemporaryDirectory() as scratch:
        mnt = Path(scratch) / "mnt"
        mnt.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sessionfs", "mount", "-f", str(state), str(mnt)],
            cwd=REPO,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mnt):
                if time.monotonic() > deadline or proc.poll() is not None:
                    print("the mount did not come up")
                    return 1
                time.sleep(0.05)
            for agent, keys in sorted(expected.items()):
                database = state / "agents" / agent / "agent" / "openclaw-agent.sqlite"
                db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
                rows = dict(db.execute("SELECT session_key, entry_json FROM session_nodes"))
                shown = {n for n in os.listdir(mnt / agent) if n.endswith(".json")}
                if shown != {key_to_display(k) for k in keys}:
                    problems.append(
                        f"{agent}: the mount lists {sorted(shown)}, OpenClaw {sorted(keys)}"
                    )
                for key in sorted(keys):
                    checked += 1
                    data = (mnt / agent / key_to_display(key)).read_bytes()
                    if orjson.loads(data) != orjson.loads(rows[key]):
                        problems.append(f"{agent}/{key}: the entry differs from its row")
                    sid = db.execute(
                        "SELECT current_session_id FROM session_nodes WHERE session_key = ?",
                        (key,),
                    ).fetchone()[0]
                    events = b"".join(
                        e.encode() + b"\n"
                        for (e,) in db.execute(
                            "SELECT event_json FROM transcript_events WHERE session_id = ? "
                            "AND event_json IS NOT NULL ORDER BY seq",
                            (sid,),
                        )
                    )
                    transcript = mnt / agent / (key_to_display(key) + "l")
                    got = transcript.read_bytes() if transcript.exists() else b""
                    if got != events:
                        problems.append(f"{agent}/{key}: the transcript differs from its events")
                db.close()
        finally:
            subprocess.run(
                [sys.executable, "-m", "sessionfs", "umount", str(mnt)], cwd=REPO, check=False
            )
            proc.wait(30)
    for problem in problems:
        print(problem)
    print(f"checked {checked} sessions OpenClaw lists: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
