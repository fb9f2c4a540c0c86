"""Key naming: both codecs as tables and as properties, and the gateway's case folding."""

from __future__ import annotations

import errno

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionfs.errors import InvalidKey
from sessionfs.keys import (
    _DISPLAY_ESCAPES,
    _encode,
    display_to_key,
    filename_to_key,
    key_to_display,
    key_to_filename,
    lookup_problem,
    normalize_key,
)
from tests.conftest import FIXTURE_STATE

BACKING = [
    # the reference's examples: OpenClaw's sanitizer, byte for byte
    ("agent:main:telegram:direct:james", "agent%3Amain%3Atelegram%3Adirect%3Ajames.json"),
    ("100%done", "100%25done.json"),
    ("hook:100%done", "hook%3A100%25done.json"),
    ("agent:main:discord:channel:a/b\\c", "agent%3Amain%3Adiscord%3Achannel%3Aa%2Fb%5Cc.json"),
    (
        "agent:main:matrix:channel:!AbCdEfGh:matrix.org",
        "agent%3Amain%3Amatrix%3Achannel%3A!AbCdEfGh%3Amatrix.org.json",
    ),
    (
        "agent:main:email:direct:ann@example.com",
        "agent%3Amain%3Aemail%3Adirect%3Aann@example.com.json",
    ),
    (
        "agent:main:whatsapp:direct:+15551234567",
        "agent%3Amain%3Awhatsapp%3Adirect%3A+15551234567.json",
    ),
    ("__proto__", "__proto__.json"),
    ("agent:main:webchat:direct:zoë 東京", "agent%3Amain%3Awebchat%3Adirect%3Azoë 東京.json"),
    ("agent:main:telegram:direct:Анна", "agent%3Amain%3Atelegram%3Adirect%3AАнна.json"),
    ("cron:daily", "cron%3Adaily.json"),
    # an escape sequence inside a key stays literal
    ("%3A", "%253A.json"),
    ("%2E.x", "%252E.x.json"),
    # ours: never a dotfile
    (".hidden", "%2Ehidden.json"),
    (".", "%2E.json"),
    ("..", "%2E..json"),
    ("./x", "%2E%2Fx.json"),
    ("a.b", "a.b.json"),
]

DISPLAY = [
    ("agent:main:telegram:direct:james", "agent:main:telegram:direct:james.json"),
    ("hook:100%done", "hook:100%25done.json"),
    ("agent:main:discord:channel:a/b\\c", "agent:main:discord:channel:a%2Fb\\c.json"),
    (
        "agent:main:matrix:channel:!AbCdEfGh:matrix.org",
        "agent:main:matrix:channel:!AbCdEfGh:matrix.org.json",
    ),
    ("__proto__", "__proto__.json"),
    ("agent:main:webchat:direct:zoë 東京", "agent:main:webchat:direct:zoë 東京.json"),
    (".hidden", "%2Ehidden.json"),
    ("a\0b", "a%00b.json"),
]


@pytest.mark.parametrize(("key", "name"), BACKING)
def test_backing_codec_table(key: str, name: str) -> None:
    assert key_to_filename(key) == name
    assert filename_to_key(name) == key


@pytest.mark.parametrize(("key", "name"), DISPLAY)
def test_display_codec_table(key: str, name: str) -> None:
    assert key_to_display(key) == name
    assert display_to_key(name) == key


def _openclaw_sanitize(key: str) -> str:
    """OpenClaw's directory-store sanitizer, transcribed from the reference."""
    for raw, esc in (("%", "%25"), ("/", "%2F"), ("\\", "%5C"), (":", "%3A")):
        key = key.replace(raw, esc)
    return key + ".json"


def _openclaw_unsanitize(name: str) -> str:
    body = name.removesuffix(".json")
    for raw, esc in reversed((("%", "%25"), ("/", "%2F"), ("\\", "%5C"), (":", "%3A"))):
        body = body.replace(esc, raw)
    return body


def fixture_keys() -> list[str]:
    keys = []
    for store in sorted(FIXTURE_STATE.glob("agents/*/sessions/sessions.json")):
        keys.extend(orjson.loads(store.read_bytes()))
    return keys


@pytest.mark.parametrize("key", fixture_keys())
def test_fixture_keys_match_openclaw(key: str) -> None:
    """Every fixture key: same file name as OpenClaw's store, both ways, and displayable."""
    name = key_to_filename(key)
    assert name == _openclaw_sanitize(key)
    assert _openclaw_unsanitize(name) == key
    assert filename_to_key(name) == key
    assert display_to_key(key_to_display(key)) == key
    assert "/" not in key_to_display(key)


def test_255_byte_limit() -> None:
    fits = "k" * 250  # + ".json" = 255 bytes
    assert len(key_to_filename(fits).encode()) == 255
    with pytest.raises(InvalidKey) as info:
        key_to_filename(fits + "k")
    assert info.value.errno == errno.ENAMETOOLONG
    assert "255" in str(info.value)
    # escapes count: 84 colons become 252 bytes
    with pytest.raises(InvalidKey):
        key_to_filename(":" * 84)
    assert key_to_display(":" * 84) == ":" * 84 + ".json"
    # multi-byte characters count in bytes, not characters
    with pytest.raises(InvalidKey):
        key_to_filename("東" * 84)


def test_empty_and_invalid_keys_are_refused() -> None:
    for bad in ("", "\udc80"):
        with pytest.raises(InvalidKey) as info:
            key_to_filename(bad)
        assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "name",
    [
        "%41.json",  # not an escape we write: %41 is not A's spelling
        "%2f.json",  # lowercase hex is not canonical
        "agent:main.json",  # a raw colon is not how we (or OpenClaw) write a key
        "x.json.json.tmp",
        ".hidden.json",
        "x%2E.json",  # %2E is only an escape at the start
        "%2",
        "plain.txt",
        ".json",
    ],
)
def test_noncanonical_backing_names_are_not_entries(name: str) -> None:
    assert filename_to_key(name) is None


@pytest.mark.parametrize(
    "name", ["%41.json", "%2f.json", "%3A.json", "x%2E.json", ".x.json", "x.txt", ".json", "%2"]
)
def test_noncanonical_display_names_name_no_key(name: str) -> None:
    """Only one name per key: `%41.json` must not become a second file for `A`."""
    assert display_to_key(name) is None


keys = st.text(min_size=1, max_size=80)


@settings(max_examples=400)
@given(keys)
def test_backing_round_trip(key: str) -> None:
    try:
        name = key_to_filename(key)
    except InvalidKey as exc:
        assert exc.errno == errno.ENAMETOOLONG
        return
    assert filename_to_key(name) == key
    assert not name.startswith(".")
    assert "/" not in name
    assert "\0" not in name
    assert len(name.encode()) <= 255


@settings(max_examples=400)
@given(keys)
def test_display_round_trip(key: str) -> None:
    try:
        name = key_to_display(key)
    except InvalidKey as exc:
        assert exc.errno == errno.ENAMETOOLONG
        return
    assert display_to_key(name) == key
    assert not name.startswith(".")
    assert "/" not in name
    assert "\0" not in name


@settings(max_examples=300)
@given(st.text(st.sampled_from("a:.%/\0é"), min_size=0, max_size=8), st.integers(0, 260))
def test_plain_ascii_keys_take_the_same_name_as_escaped_ones(tail: str, length: int) -> None:
    """The fast path for keys that need no escape names them as the escaping rules do,
    up to the length limit (``.json`` makes 250 characters the longest)."""
    key = ("k" * length)[: max(length - len(tail), 0)] + tail
    try:
        expected: str | None = _encode(key, _DISPLAY_ESCAPES)
    except InvalidKey:
        expected = None
    try:
        name: str | None = key_to_display(key)
    except InvalidKey:
        name = None
    assert name == expected


@settings(max_examples=400)
@given(st.text(max_size=40))
def test_decoders_accept_only_canonical_names(name: str) -> None:
    """Whatever name a user types, it stands for a key only if it is that key's spelling."""
    for decode, encode in ((filename_to_key, key_to_filename), (display_to_key, key_to_display)):
        key = decode(name + ".json")
        if key is not None:
            assert encode(key) == name + ".json"


@settings(max_examples=200)
@given(keys)
def test_every_storable_key_is_displayable(key: str) -> None:
    try:
        key_to_filename(key)
    except InvalidKey:
        return
    assert display_to_key(key_to_display(key)) == key


@pytest.mark.parametrize(
    ("key", "normalized"),
    [
        ("agent:main:telegram:direct:James", "agent:main:telegram:direct:james"),
        ("  Agent:Main:MAIN ", "agent:main:main"),
        ("agent:main:signal:group:QUJDREVGR0g=", "agent:main:signal:group:QUJDREVGR0g="),
        (
            "Agent:Main:Signal:Group:QUJDREVGR0g=:Thread:X",
            "agent:main:signal:group:QUJDREVGR0g=:thread:x",
        ),
        (
            "agent:main:matrix:channel:!AbCdEfGh:matrix.org",
            "agent:main:matrix:channel:!AbCdEfGh:matrix.org",
        ),
        (
            "AGENT:main:Matrix:Group:!Room:Server.Org:Thread:T1",
            "agent:main:matrix:group:!Room:Server.Org:thread:t1",
        ),
        ("agent:main:matrix:direct:@Bob:matrix.org", "agent:main:matrix:direct:@bob:matrix.org"),
        ("cron:ABC", "cron:abc"),
    ],
)
def test_normalize_key(key: str, normalized: str) -> None:
    assert normalize_key(key) == normalized


@settings(max_examples=200)
@given(keys)
def test_normalize_is_idempotent(key: str) -> None:
    once = normalize_key(key)
    assert normalize_key(once) == once


@pytest.mark.parametrize(
    ("key", "agent", "problem"),
    [
        ("agent:main:main", "main", None),
        ("cron:job-1", "work", None),
        ("hook:abc", None, None),
        ("UPPER:Case", "main", "the gateway looks this key up as 'upper:case'"),
        (" agent:main:x", "main", "the gateway looks this key up as 'agent:main:x'"),
        ("agent:main:main", "work", "this key belongs to agent 'main', not to 'work'"),
        ("agent:main:main", None, None),
        ("agent:main:matrix:group:!AbC:matrix.org", "main", None),
        ("agent:main:signal:group:XyZ", "main", None),
    ],
)
def test_lookup_problem(key: str, agent: str | None, problem: str | None) -> None:
    assert lookup_problem(key, agent) == problem
