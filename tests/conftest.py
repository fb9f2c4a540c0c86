"""Shared fixtures: copies of the fixture state, and the FUSE requirement."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

FIXTURE_STATE = Path(__file__).parent / "fixtures" / "openclaw-state"


def fuse_missing() -> str | None:
    """Why a mount cannot work here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "fuse" not in item.keywords:
        return
    reason = fuse_missing()
    if reason is None:
        return
    if os.environ.get("SESSIONFS_REQUIRE_FUSE") == "1":
        pytest.fail(f"this test needs FUSE and SESSIONFS_REQUIRE_FUSE=1: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A private copy of the JSON-era fixture state dir."""
    target = tmp_path / "state"
    shutil.copytree(FIXTURE_STATE, target, symlinks=True)
    return target


# What must never appear in a daemon's log or in this process's log records: a failure
# the code did not expect.  As in s3ql's checklogs, the test that caused it fails.
_UNEXPECTED = re.compile(
    r"Traceback \(most recent call last\)|internal error|--- Logging error ---"
)


# Taken now: a test may still have os.scandir patched when its logs are checked.
_scandir = os.scandir


def _logs_under(top: Path) -> Iterator[Path]:
    try:
        listing = list(_scandir(top))
    except OSError:  # e.g. a mount a test left dead: its logs lie beside it
        return
    for entry in listing:
        if entry.is_dir(follow_symlinks=False):
            yield from _logs_under(Path(entry.path))
        elif entry.is_file(follow_symlinks=False) and entry.name.endswith(".log"):
            yield Path(entry.path)


def _unexpected_lines(text: str, allowed: tuple[str, ...]) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if _UNEXPECTED.search(line) and not any(pattern in line for pattern in allowed)
    ]


@pytest.fixture(autouse=True)
def check_logs(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    """Fail a test whose daemons (or in-process code) logged a traceback or an internal error.

    Daemons started by the test log under its tmp_path: foreground mounts beside their
    mountpoint, background ones under XDG_STATE_HOME, which points there too.  A test that
    provokes such a line on purpose names it with ``@pytest.mark.expected_log("...")``.
    """
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    yield
    marker = request.node.get_closest_marker("expected_log")
    allowed = tuple(marker.args) if marker else ()
    found = [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.get_records("call")
        if record.levelno >= logging.ERROR
        and (record.exc_info or "internal error" in record.getMessage())
        and not any(pattern in record.getMessage() for pattern in allowed)
    ]
    for log in sorted(_logs_under(tmp_path)):
        text = log.read_text(errors="backslashreplace")
        found += [f"{log.name}: {line}" for line in _unexpected_lines(text, allowed)]
    if found:
        pytest.fail("unexpected lines in the logs:\n" + "\n".join(found), pytrace=False)
