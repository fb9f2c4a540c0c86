"""Text sessionfs prints to a terminal: paths in commands to paste, quoted for a POSIX
shell, and keys, names and paths anyone may have written, with what a terminal would act
on shown escaped."""

from __future__ import annotations

import os
import shlex


def quote(path: str | os.PathLike[str]) -> str:
    """*path* as one shell word naming exactly it: ``shlex.quote`` for printable text,
    bash's ``$'...'`` with ``\\xHH`` escapes for bytes that are not UTF-8 or print
    nothing (a newline, an escape), which a terminal would otherwise garble."""
    text = os.fspath(path)
    if text.isprintable():
        return shlex.quote(text)
    raw = os.fsencode(text)
    return "$'" + "".join(_escaped(byte) for byte in raw) + "'"


def _escaped(byte: int) -> str:
    if 0x20 <= byte < 0x7F and byte not in b"'\\":
        return chr(byte)
    return f"\\x{byte:02x}"


def printable(text: str) -> str:
    """*text* with every character a terminal would act on written as an escape (a
    newline or an escape sequence in a key must not forge a line or drive the terminal)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
