"""Realistic JSON-era OpenClaw state, generated: for ``sessionfs demo``, tests and benchmarks.

The keys cover what real gateways hold, including the awkward ones: ``%``, ``/``,
``\\``, Matrix room ids with their case, non-Latin peers, ``__proto__`` and case
variants of one key that migration has to fold.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson

from .entry import Entry

_CHANNELS = ("telegram", "whatsapp", "signal", "discord", "slack", "imessage", "webchat")
_PEERS = ("james", "ann", "+15551234567", "zoë", "Анна", "東京", "bob.smith", "m@example.com")
_MODELS = (("claude-opus-4", "anthropic"), ("gpt-5", "openai"), ("gemini-3-pro", "google"))
_SPECIAL_KEYS = (
    "agent:{agent}:matrix:channel:!AbCdEfGh:matrix.org",
    "agent:{agent}:signal:group:QUJDREVGR0g=",
    "agent:{agent}:discord:channel:ops/alerts\\eu",
    "hook:100%done",
    "agent:{agent}:webchat:direct:zoë 東京",
    "__proto__",
    "agent:{agent}:telegram:direct:james",
    "agent:{agent}:telegram:direct:James",  # a case variant of the one above: folded on migration
)
BASE_TIME_MS = 1_764_000_000_000
"""Where generated activity begins unless told to end now: tests and benchmarks repeat."""
DEMO_SPACING_MS = 9 * 3_600_000
"""Between two demo sessions' activity: 50 span two weeks, inside every default retention."""


def _session_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def make_entry(rng: random.Random, key: str, updated_at: int) -> Entry:
    channel = next((c for c in _CHANNELS if f":{c}:" in key), "webchat")
    chat_type = "group" if (":group:" in key or ":channel:" in key) else "direct"
    peer = key.rsplit(":", 1)[-1]
    model, provider = rng.choice(_MODELS)
    inputs, outputs = rng.randrange(100, 90_000), rng.randrange(50, 30_000)
    return {
        "sessionId": _session_id(rng),
        "updatedAt": updated_at,
        "chatType": chat_type,
        "lastChannel": channel,
        "lastTo": f"{channel}:{peer}",
        "origin": {
            "provider": channel,
            "surface": channel,
            "chatType": chat_type,
            "from": f"{channel}:{peer}",
            "to": f"{channel}:bot",
        },
        "deliveryContext": {"channel": channel, "to": f"{channel}:{peer}"},
        "displayName": peer,
        "model": model,
        "modelProvider": provider,
        "inputTokens": inputs,
        "outputTokens": outputs,
        "totalTokens": inputs + outputs,
        "contextTokens": 200_000,
        "compactionCount": rng.randrange(0, 6),
        "skillsSnapshot": {
            "prompt": "You can use these skills:\n" + "- skill\n" * rng.randrange(1, 12)
        },
    }


def demo_keys(agent: str, count: int, rng: random.Random) -> list[str]:
    keys = [f"agent:{agent}:main"] + [k.format(agent=agent) for k in _SPECIAL_KEYS]
    i = 0
    while len(keys) < count:
        i += 1
        kind = rng.random()
        if kind < 0.6:
            channel = rng.choice(_CHANNELS)
            keys.append(f"agent:{agent}:{channel}:direct:{rng.choice(_PEERS)}{i}")
        elif kind < 0.8:
            keys.append(f"agent:{agent}:{rng.choice(_CHANNELS)}:group:-100{rng.randrange(10**9)}")
        elif kind < 0.9:
            keys.append(f"cron:{_session_id(rng)}")
        else:
            keys.append(f"agent:{agent}:subagent:{_session_id(rng)}")
    return keys[:count]


def write_legacy_store(
    sessions_dir: Path,
    agent: str,
    count: int,
    *,
    seed: int = 7,
    transcripts: bool = True,
    newest_ms: int | None = None,
    spacing_ms: int = 60_000,
) -> dict[str, Entry]:
    """Write a JSON-era ``sessions.json`` of *count* entries (and their transcripts).

    Activity is about *spacing_ms* apart, from ``BASE_TIME_MS`` on, or ending just
    before *newest_ms* when given (the demo: a state that looks used today).
    """
    rng = random.Random(f"{seed}:{agent}")
    first_ms = BASE_TIME_MS if newest_ms is None else newest_ms - count * spacing_ms
    sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store: dict[str, Entry] = {}
    for n, key in enumerate(demo_keys(agent, count, rng)):
        updated_at = first_ms + n * spacing_ms + rng.randrange(spacing_ms)
        store[key] = make_entry(rng, key, updated_at)
        if transcripts and n < 200:
            header = {
                "type": "session",
                "id": store[key]["sessionId"],
                "cwd": "/home/u",
                "timestamp": datetime.fromtimestamp(updated_at / 1000, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
            }
            transcript = sessions_dir / f"{store[key]['sessionId']}.jsonl"
            transcript.write_bytes(
                orjson.dumps(header)
                + b'\n{"type":"message","message":{"role":"user","content":"hi"}}\n'
            )
            os.utime(transcript, ns=(updated_at * 1_000_000,) * 2)  # last written then
    (sessions_dir / "sessions.json").write_bytes(orjson.dumps(store, option=orjson.OPT_INDENT_2))
    return store


def build_demo_state(state_dir: Path, *, seed: int = 7) -> Path:
    """A state dir with two agents and 50 sessions, the way a JSON-era gateway leaves it.

    The sessions were active over the last two weeks, so what the demo shows (``ls``
    by recency, ``maintain --dry-run``) is what a live gateway's state would show.
    """
    now_ms = time.time_ns() // 1_000_000
    old_umask = os.umask(0o077)
    try:
        for agent, count in (("main", 36), ("work", 14)):
            write_legacy_store(
                state_dir / "agents" / agent / "sessions",
                agent,
                count,
                seed=seed,
                newest_ms=now_ms,
                spacing_ms=DEMO_SPACING_MS,
            )
    finally:
        os.umask(old_umask)
    return state_dir
