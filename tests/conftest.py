"""Shared fixtures: copies of the fixture state, and the FUSE requirement."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
