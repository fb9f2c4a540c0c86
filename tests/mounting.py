"""Mount sessionfs for real in a subprocess, for the end-to-end tests."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from sessionfs.daemon import is_mounted

REPO = Path(__file__).parent.parent
SESSIONFS = [sys.executable, "-m", "sessionfs"]


def sessionfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would; output captured (a daemon must not hold it open)."""
    return subprocess.run(
        [*SESSIONFS, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    """Poll *predicate* until it holds; fail with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[str]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stats(self) -> dict[str, Any]:
        """``.sessionfs/stats``: ``since_mount`` totals, ``now`` and ``last_check``."""
        value = orjson.loads((self.path / ".sessionfs" / "stats").read_bytes())
        assert isinstance(value, dict)
        return value

    def stop(self, sig: signal.Signals | None = None) -> int:
        """Unmount (with `sessionfs umount`, or by sending *sig*) and return the exit status."""
        if self.proc.poll() is None:
            if sig is None:
                result = sessionfs("umount", str(self.path))
                assert result.returncode == 0, result.stderr
            else:
                self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def start_mount(source: Path, mountpoint: Path, *args: str) -> Mount:
    """Start ``sessionfs mount -f`` and return once the mount is live."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [*SESSIONFS, "mount", "-f", str(source), str(mountpoint), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            cwd=REPO,
        )
    mount = Mount(mountpoint, proc, log)
    wait_for(lambda: is_mounted(mountpoint) or proc.poll() is not None, what="the mount")
    if proc.poll() is not None:
        pytest.fail(f"sessionfs mount exited {proc.returncode}:\n{mount.log_text()}")
    return mount


def cleanup(mount: Mount) -> None:
    """Whatever state a test left: no daemon, no mount."""
    if mount.proc.poll() is None:
        mount.proc.send_signal(signal.SIGKILL)
        mount.proc.wait()
    if is_mounted(mount.path):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mount.path)], check=False, capture_output=True
        )


@contextlib.contextmanager
def mounted(source: Path, mountpoint: Path, *args: str, clean_exit: bool = True) -> Iterator[Mount]:
    """Mount *source* in the foreground; yield once live; unmount and check a clean exit.

    With *clean_exit* false the test ends the daemon its own way and checks it itself.
    """
    mount = start_mount(source, mountpoint, *args)
    try:
        yield mount
        if clean_exit:
            assert mount.stop() == 0, mount.log_text()
            assert not is_mounted(mountpoint)
            text = mount.log_text()
            bad = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
            assert not bad, text
            assert "unmounted" in text
    finally:
        cleanup(mount)
