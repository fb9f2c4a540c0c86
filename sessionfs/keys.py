"""Session keys and the names that stand for them.

Three spellings of one key exist:

* the key itself, e.g. ``agent:main:telegram:direct:james``;
* its backing file name in ``sessions.d/`` -- OpenClaw's sanitizer
  (``agent%3Amain%3Atelegram%3Adirect%3Ajames.json``), so stores written by
  OpenClaw's directory store read back correctly and ours are readable by it;
* its name in the mount -- the key plus ``.json`` with only the characters
  escaped that a file name cannot hold or that would hide it.

Both codecs are total over non-empty keys of Unicode scalar values and strict on
the way back: a name that is not the canonical spelling of a key decodes to
``None``, so two names can never reach the same key.
"""

from __future__ import annotations

import errno
import re

from .errors import InvalidKey

SUFFIX = ".json"
NAME_MAX = 255  # bytes, Linux's limit for one path component

# OpenClaw's sanitizer, in its order; decoding runs it backwards.  NUL is ours:
# no file name can hold it, and OpenClaw could never have written such a file.
_BACKING_ESCAPES = (("%", "%25"), ("/", "%2F"), ("\\", "%5C"), (":", "%3A"), ("\0", "%00"))
_DISPLAY_ESCAPES = (("%", "%25"), ("/", "%2F"), ("\0", "%00"))
_LEADING_DOT = "%2E"

_BACKING_ESCAPE_RE = re.compile("%(25|2F|5C|3A|00)")
_DISPLAY_ESCAPE_RE = re.compile("%(25|2F|00)")
_UNESCAPE = {"25": "%", "2F": "/", "5C": "\\", "3A": ":", "00": "\0"}


def _encode(key: str, escapes: tuple[tuple[str, str], ...]) -> str:
    if not key:
        raise InvalidKey("a session key must not be empty")
    for raw, escaped in escapes:
        key = key.replace(raw, escaped)
    if key.startswith("."):
        # A leading dot would make a hidden file that OpenClaw's loader skips.
        key = _LEADING_DOT + key[1:]
    name = key + SUFFIX
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("a session key must be valid Unicode (no lone surrogates)") from None
    if size > NAME_MAX:
        raise InvalidKey(
            f"the file name for this key would be {size} bytes; the limit is {NAME_MAX}",
            code=errno.ENAMETOOLONG,
        )
    return name


def _decode(
    name: str, pattern: re.Pattern[str], escapes: tuple[tuple[str, str], ...]
) -> str | None:
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    body = name[: -len(SUFFIX)]
    if body.startswith(_LEADING_DOT):
        body = "." + body[len(_LEADING_DOT) :]
    key = pattern.sub(lambda m: _UNESCAPE[m.group(1)], body)
    try:
        canonical = _encode(key, escapes)
    except InvalidKey:
        return None
    return key if canonical == name else None


def key_to_filename(key: str) -> str:
    """The file name of *key* in ``sessions.d/``; raises :class:`InvalidKey`."""
    return _encode(key, _BACKING_ESCAPES)


def filename_to_key(name: str) -> str | None:
    """The key stored in ``sessions.d/<name>``, or ``None`` if *name* is not an entry's."""
    return _decode(name, _BACKING_ESCAPE_RE, _BACKING_ESCAPES)


_DISPLAY_PLAIN_MAX = NAME_MAX - len(SUFFIX)
_DISPLAY_SPECIAL_RE = re.compile("[%/\0]")


def key_to_display(key: str) -> str:
    """The name *key* has in the mount; raises :class:`InvalidKey`."""
    # Almost every key needs no escape: a listing of 20,000 names asks this 20,000 times
    if (
        key.isascii()
        and 0 < len(key) <= _DISPLAY_PLAIN_MAX
        and key[0] != "."
        and _DISPLAY_SPECIAL_RE.search(key) is None
    ):
        return key + SUFFIX
    return _encode(key, _DISPLAY_ESCAPES)


def display_to_key(name: str) -> str | None:
    """The key a name in the mount stands for, or ``None`` if it is not a canonical one."""
    return _decode(name, _DISPLAY_ESCAPE_RE, _DISPLAY_ESCAPES)


# The gateway keeps the case of Signal group ids and Matrix room ids (both are
# case-sensitive upstream) and lowercases everything else when it looks a key up.
_SIGNAL_GROUP_RE = re.compile(r"signal:group:", re.IGNORECASE)
_MATRIX_ROOM_RE = re.compile(
    r"^(agent:[^:]*:matrix:(?:channel|group):)(.*?)((?::thread:.*)?)$", re.IGNORECASE | re.DOTALL
)


def normalize_key(key: str) -> str:
    """The spelling the gateway looks *key* up by; case variants of one key share it."""
    key = key.strip()
    matrix = _MATRIX_ROOM_RE.match(key)
    if matrix:
        prefix, room, thread = matrix.groups()
        return prefix.lower() + room + thread.lower()
    signal = _SIGNAL_GROUP_RE.search(key)
    if signal:
        start = signal.end()
        end = key.find(":", start)
        end = len(key) if end < 0 else end
        return key[:start].lower() + key[start:end] + key[end:].lower()
    return key.lower()


def lookup_problem(key: str, agent_id: str | None) -> str | None:
    """Why the gateway would never find *key* in *agent_id*'s store; None if it would.

    The gateway looks every key up in its normalized spelling, and an agent only
    ever looks up its own ``agent:<id>:`` keys; keys without an agent part
    (``cron:``, ``hook:``) belong anywhere.  *agent_id* None: the store's agent is
    not known, so only the spelling is checked.
    """
    normalized = normalize_key(key)
    if normalized != key:
        return f"the gateway looks this key up as {normalized!r}"
    if agent_id is not None and key.startswith("agent:"):
        owner = key.split(":", 2)[1]
        if owner != agent_id:
            return f"this key belongs to agent {owner!r}, not to {agent_id!r}"
    return None
