"""The log check itself: a traceback in a daemon log fails the test that caused it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CONFTEST = Path(__file__).parent / "conftest.py"


def _run(pytester: pytest.Pytester, body: str) -> pytest.RunResult:
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    (pytester.path / "fixtures").mkdir()
    pytester.makeini(
        "[pytest]\nmarkers =\n    expected_log(*patterns): expected\n    fuse: mounts\n"
    )
    pytester.makepyfile(test_it=body)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def test_a_traceback_in_a_daemon_log_fails_the_test(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
def test_daemon(tmp_path):
    (tmp_path / "mnt.log").write_text("Traceback (most recent call last):\\n  boom\\n")

def test_background_daemon(tmp_path):
    import os, pathlib
    log = pathlib.Path(os.environ["XDG_STATE_HOME"]) / "sessionfs" / "m.log"
    log.parent.mkdir(parents=True)
    log.write_text("x ERROR   internal error in read(5); answered EIO\\n")

def test_clean(tmp_path):
    (tmp_path / "mnt.log").write_text("x INFO    unmounted\\n")
""",
    )
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(["*unexpected lines in the logs*", "*mnt.log: Traceback*"])


def test_expected_lines_and_in_process_records(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
import logging, pytest

@pytest.mark.expected_log("internal error in lookup")
def test_expected(tmp_path):
    (tmp_path / "mnt.log").write_text("internal error in lookup(1, x); answered EIO\\n")

def test_in_process():
    try:
        raise ValueError("gremlin")
    except ValueError:
        logging.getLogger("sessionfs").exception("while ending grace periods")
""",
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*sessionfs: while ending grace periods*"])
