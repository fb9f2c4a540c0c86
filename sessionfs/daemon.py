"""The mount daemon's life: check the mountpoint, migrate, daemonize, serve, unmount.

Without ``--foreground`` the parent forks a daemon and waits on a pipe until the mount
is live (or fails), like sshfs; the daemon points its stdio at the log so nobody
capturing the parent's output waits on it.  SIGINT, SIGTERM and SIGHUP end the FUSE
loop and unmount; ``auto_unmount`` covers a SIGKILL; a dead mount left by a crash
is cleaned by the next mount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import orjson
import pyfuse3
import trio

from . import fsck, listing, maintain, migrate, revert
from .catalog import Catalog, open_store
from .errors import SessionFSError, describe_error
from .fs import CONFLICT_LAST_WINS, Filesystem, Limits, assemble
from .fs.editing import LOCK_TIMEOUT
from .locking import pid_alive
from .mounts import (
    CONTROL_TIMEOUT,
    FS_TYPE,
    absolute,
    control_line,
    find_mount,
    fsname_for,
    mount_table,
    read_control,
    sessionfs_mounts,
    source_of,
)
from .shell import quote
from .sources import Era, Source, SourceKind, resolve

log = logging.getLogger("sessionfs")

READY_TIMEOUT = 120.0  # seconds `mount` waits for its daemon to serve
UNREAD_MIGRATION_CHECK_SECONDS = 2.0  # how often the mount looks for a new sessions.json
CACHE_TIMEOUT = 300.0  # seconds; the watcher invalidates changes long before
UNMOUNT_WAIT = 10.0
# Requests served at once.  Each waiting request holds one pyfuse3 task (cheap: a
# trio task, no thread); pyfuse3's default of 99 would let 99 writers waiting for
# one locked session stop the mount from reading any other request.
MAX_REQUESTS = 10_000
CHECK_EVERY = 3600.0
CHECK_DELAY = 30.0
AUDIT_FLUSH_EVERY = 2.0  # seconds: held-back audit lines reach the disk this soon


class MountError(SessionFSError):
    default_errno = errno.EINVAL


@dataclass
class MountConfig:
    source: Source
    mountpoint: Path
    foreground: bool = False
    migrate: bool = True
    read_only: bool = False  # -o ro: the kernel answers every write EROFS
    allow_other: bool = False
    auto_unmount: bool = True
    debug: bool = False
    log_file: Path | None = None
    conflict: str = CONFLICT_LAST_WINS
    lock_timeout: float = LOCK_TIMEOUT
    maintain_every: float | None = None  # seconds between background maintenance runs
    check_every: float = CHECK_EVERY  # seconds between background fsck runs; 0: never
    maintain_mode: str = "warn"
    maintain_policy: maintain.Policy = field(default_factory=maintain.Policy)
    uid: int | None = None  # -o uid=, gid=: who owns what the mount shows
    gid: int | None = None


def mount_serving(path: Path) -> tuple[Path, bool, bool] | None:
    """``(mountpoint, whether it is known to serve it, whether its daemon answers)``
    of a sessionfs mount whose source contains or lies inside *path*.

    A store must not be changed behind its daemon (fsck --repair, maintenance of a
    mounted store).  The mount table names each mount's source; a daemon is asked
    only to learn whether it is alive, or its source when the table does not name
    it, and then one that does not answer is assumed to serve *path*.  A dead mount
    serves nothing and stops no command.
    """
    target = Path(os.path.realpath(path))  # a symlink to a mounted store is that store
    for entry in mount_table():
        if entry.fstype != FS_TYPE:
            continue
        mountpoint = Path(entry.mountpoint)
        named = source_of(entry)  # (from the mount table: nothing to ask, nobody to wait for)
        try:
            if named is not None:
                if not _related(Path(os.path.realpath(named)), target):
                    continue
                control_line(mountpoint, "pid")  # alive? (a dead one serves nothing)
                return mountpoint, True, True
            source = Path(os.path.realpath(control_line(mountpoint, "source")))
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                continue  # dead: nothing writes behind it, the next mount cleans it
            # hung, or another user's: the table's name says whether it serves *path*
            return mountpoint, named is not None, exc.errno in (errno.EACCES, errno.EPERM)
        if _related(source, target):
            return mountpoint, True, True
    return None


def _related(source: Path, target: Path) -> bool:
    return source == target or source in target.parents or target in source.parents


def is_mounted(path: Path, fstype: str = FS_TYPE) -> bool:
    """Whether a filesystem of *fstype* is mounted exactly at *path*."""
    entry = find_mount(path)
    return entry is not None and entry.fstype == fstype


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 is missing: apt-get install fuse3")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


FUSE_DEVICE = "/dev/fuse"


def check_allow_other(config: MountConfig, fuse_conf: Path = Path("/etc/fuse.conf")) -> None:
    """``-o allow_other`` by a user other than root needs ``user_allow_other`` (fuse.conf)."""
    if not config.allow_other or os.geteuid() == 0:
        return
    try:
        lines = fuse_conf.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    if not any(line.strip() == "user_allow_other" for line in lines):
        raise MountError(
            f"-o allow_other needs user_allow_other in {fuse_conf}: "
            f"echo user_allow_other | sudo tee -a {fuse_conf}"
        )


def check_fuse() -> None:
    """Fail now, in the user's words, if this process cannot mount a FUSE filesystem.

    Checked before anything is migrated: a mount that cannot start must not have
    changed the store first.
    """
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(
            f"{FUSE_DEVICE} does not exist: load the FUSE module (sudo modprobe fuse), or in a "
            "container, start it with --device /dev/fuse"
        ) from None
    except PermissionError:
        raise MountError(
            f"no permission to open {FUSE_DEVICE}: run `sudo chmod 0666 {FUSE_DEVICE}` or add "
            "yourself to the group that owns it"
        ) from None
    except OSError as exc:
        raise MountError(f"cannot open {FUSE_DEVICE}: {exc.strerror}") from None
    os.close(fd)
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is missing (it unmounts FUSE filesystems): install fuse3")


def probe(path: Path, timeout: float = CONTROL_TIMEOUT) -> str:
    """Whether the sessionfs daemon behind *path* is "alive", "dead" or "hung".

    Opening a control file always reaches the daemon (the kernel caches names and
    attributes, never an open), so a dead connection answers ENOTCONN at once even
    while a cached ``stat`` of the mountpoint still succeeds.
    """
    try:
        read_control(path, "pid", timeout)
    except OSError as exc:
        if exc.errno == errno.ETIMEDOUT:
            return "hung"
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return "dead"
    return "alive"


def mounted_refusal(path: Path, what: str) -> str | None:
    """Why *what* must not run now: it would change the store at *path* behind the
    daemon of the mount serving it (None: no mount serves it)."""
    serving = mount_serving(path)
    if serving is None:
        return None
    mountpoint, known, answers = serving
    umount = (
        f"sessionfs umount {quote(mountpoint)}"
        if answers
        else f"sessionfs umount --lazy {quote(mountpoint)}"
    )
    if not known:
        return (
            f"the sessionfs mount at {mountpoint} does not answer and may serve {path}; "
            f"{what} must not change a store behind a daemon: run `{umount}` first"
        )
    return (
        f"{path} is mounted at {mountpoint}; {what} must not change it behind the "
        f"daemon: run it after `{umount}`"
    )


def prepare_mountpoint(path: Path) -> list[str]:
    """Check *path* can be mounted on; clean a dead sessionfs mount.  Returns notices."""
    notices = []
    entry = find_mount(path)
    if entry is not None and entry.fstype == FS_TYPE:
        state = probe(path)
        if state == "alive":
            raise MountError(
                f"{path} is already a sessionfs mount; run `sessionfs umount {quote(path)}` first"
            )
        if state == "hung":
            raise MountError(
                f"{path} is a sessionfs mount whose daemon does not answer; "
                f"run `sessionfs umount --lazy {quote(path)}` first"
            )
        result = _fusermount("-u", "-z", entry.mountpoint)
        if result.returncode != 0:
            raise MountError(f"could not clean the dead mount at {path}: {result.stderr.strip()}")
        notices.append(f"cleaned up a dead sessionfs mount at {path} (its daemon had died)")
    if os.path.islink(path):
        raise MountError(
            f"mountpoint {path} is a symlink (to {os.readlink(path)}); mount on the directory "
            "itself"
        )
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"{path} is a dead mount of another filesystem; unmount it first"
            ) from None
        if exc.errno == errno.ENOENT:
            raise MountError(
                f"mountpoint {path} does not exist; create it with: mkdir -p {quote(path)}"
            ) from None
        raise MountError(f"mountpoint {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    if os.geteuid() != 0 and not os.access(path, os.W_OK):
        raise MountError(
            f"no write access to mountpoint {path} (fusermount3 needs it): mount on a "
            "directory you own"
        )
    if is_mounted(path):
        raise MountError(f"{path} is still a sessionfs mount; run `sessionfs umount {quote(path)}`")
    try:
        with os.scandir(path) as listing:
            occupied = next(iter(listing), None) is not None
    except OSError as exc:
        raise MountError(f"mountpoint {path}: {exc.strerror}") from None
    if occupied:
        raise MountError(
            f"mountpoint {path} is not empty; its files would be hidden while mounted: "
            "mount on an empty directory"
        )
    return notices


def default_log_file(mountpoint: Path) -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    name = str(absolute(mountpoint)).strip("/").replace("%", "%25").replace("/", "%2F") or "root"
    return state / "sessionfs" / f"{name}.log"


def _configure_logging(stream: TextIO, debug: bool) -> None:
    if isinstance(stream, io.TextIOWrapper):
        # File names on disk need not be UTF-8 (they reach us surrogate-escaped):
        # a log line must show them escaped, never fail with "--- Logging error ---".
        stream.reconfigure(errors="backslashreplace")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def check_outside_source(config: MountConfig) -> None:
    """A mountpoint inside the store it shows would be watched and listed by its own
    daemon, whose requests to itself could never be answered."""
    source = Path(os.path.realpath(config.source.path))
    target = Path(os.path.realpath(config.mountpoint))
    if config.source.kind in (SourceKind.ENTRIES_DIR, SourceKind.LEGACY_FILE):
        source = source.parent  # the sessions dir: its transcripts are shown too
    if target == source or source in target.parents:
        raise MountError(
            f"mountpoint {config.mountpoint} lies inside the store it would show "
            f"({config.source.path}): mount outside it"
        )


def check_log_file(config: MountConfig) -> Path | None:
    """The daemon's log file, created now: a daemon that cannot log must not start
    after a migration, nor say why only in a traceback."""
    if config.foreground:
        return None
    log_file = config.log_file or default_log_file(config.mountpoint)
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise MountError(
            f"cannot write the daemon's log {log_file}: {describe_error(exc)}; "
            "choose another with --log FILE"
        ) from None
    return log_file


def mount(config: MountConfig, out: TextIO = sys.stdout) -> int:
    """``sessionfs mount``: returns once the mount is live (or failed), or serves with -f.

    Everything that can be checked before the store is changed is checked first.
    """
    check_outside_source(config)
    for notice in prepare_mountpoint(config.mountpoint):
        print(notice, file=out)
    check_fuse()
    check_allow_other(config)
    log_file = check_log_file(config)
    migrated = False
    if config.migrate:
        reports = migrate.migrate_source(config.source)
        for report in reports:
            if report.outcome is not migrate.Outcome.NOTHING_TO_DO:
                print("\n".join(report.lines()), file=out)
        migrated = any(r.outcome is migrate.Outcome.MIGRATED for r in reports)
        if not migrate.all_ok(reports):
            print(
                "some agents were not migrated; they are shown read-only from sessions.json",
                file=out,
            )
    with contextlib.suppress(OSError):  # (a warning; never a reason not to mount)
        for unread in revert.unread_migrations(config.source):
            print(f"sessionfs: WARNING: {unread.message(config.source)}", file=sys.stderr)
    code = 1
    try:
        code = _mount_migrated(config, out, log_file)
    finally:
        if code != 0 and migrated:  # never mounted (serving ends with 0)
            _tell_how_to_revert(config)
    return code


def _tell_how_to_revert(config: MountConfig) -> None:
    print(
        f"sessionfs: the mount failed after migrating {config.source.path}; a gateway that "
        f"reads sessions.json needs it back: {revert.revert_command(config.source)}",
        file=sys.stderr,
    )


def _mount_migrated(config: MountConfig, out: TextIO, log_file: Path | None) -> int:
    """*log_file*: where the daemon logs (checked by :func:`check_log_file`), None in
    the foreground."""
    retention = config.maintain_policy.history  # (--history-keep, --history-age, --no-history)
    catalog = Catalog(
        config.source, store_factory=functools.partial(open_store, retention=retention)
    )
    out.flush()
    if config.foreground:
        _configure_logging(sys.stderr, config.debug)
        return serve(config, catalog, ready_fd=None)

    assert log_file is not None  # (not in the foreground)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        code = 1
        try:
            os.setsid()
            _detach_stdio(log_file)
            _configure_logging(sys.stderr, config.debug)
            code = serve(config, catalog, ready_fd=write_end)
        except BaseException:  # a daemon must never unwind into the caller's code
            with contextlib.suppress(Exception):
                log.exception("daemon failed")
        finally:
            os._exit(code)
    os.close(write_end)
    message = _await_daemon(read_end, pid, log_file)
    if message == "ready":
        print(
            f"mounted {config.source.path} at {config.mountpoint} (pid {pid}; log {log_file})",
            file=out,
        )
        return 0
    os.waitpid(pid, 0)
    print(
        f"sessionfs: {message or f'the daemon died before the mount was ready; see {log_file}'}",
        file=sys.stderr,
    )
    return 1


def _await_daemon(read_end: int, pid: int, log_file: Path) -> str:
    """What the daemon says once the mount serves ("ready") or why it could not.

    A daemon that says nothing within READY_TIMEOUT is stuck (a mount cannot take that
    long to start): it is killed, so ``mount`` never hangs and the mount goes with it
    (auto_unmount).
    """
    chunks: list[bytes] = []
    deadline = time.monotonic() + READY_TIMEOUT
    with os.fdopen(read_end, "rb") as pipe:
        while (left := deadline - time.monotonic()) > 0:
            if select.select([pipe], [], [], left)[0]:
                chunk = pipe.read1(4096)
                if not chunk:
                    return b"".join(chunks).decode(errors="replace").strip()
                chunks.append(chunk)
    os.kill(pid, signal.SIGKILL)
    return (
        f"the daemon did not report the mount ready within {READY_TIMEOUT:.0f} s and was "
        f"stopped; see {log_file}"
    )


def _detach_stdio(log_file: Path) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115


def serve(config: MountConfig, catalog: Catalog, ready_fd: int | None) -> int:
    """Mount, serve until unmounted or signalled, unmount.  The daemon's (or -f's) main."""
    # The watcher invalidates what changes behind the mount, so the kernel may
    # cache entries, attributes and pages for long.
    limits = Limits(max_entry_bytes=catalog.max_entry_bytes, lock_timeout=config.lock_timeout)
    fs = assemble(
        catalog,
        debug=config.debug,
        cache_timeout=CACHE_TIMEOUT,
        conflict=config.conflict,
        limits=limits,
        log="stderr"
        if ready_fd is None
        else str(config.log_file or default_log_file(config.mountpoint)),
        uid=config.uid,
        gid=config.gid,
    )
    options = {f"fsname={fsname_for(config.source.path)}", "subtype=sessionfs"}
    options.add("default_permissions")
    if config.auto_unmount:
        options.add("auto_unmount")
    if config.allow_other:
        options.add("allow_other")
    if config.read_only:
        options.add("ro")
    shutdown = _Shutdown()
    # A signal between the mount going live and trio's receiver taking over must
    # not kill us with the mount still there: remember it and act on it in trio.
    previous = {sig: signal.signal(sig, shutdown.remember) for sig in STOP_SIGNALS}
    try:
        pyfuse3.init(fs.operations, str(config.mountpoint), options)
    except RuntimeError as exc:
        _report(ready_fd, f"could not mount at {config.mountpoint}: {exc} (see the log)")
        log.error("could not mount at %s: %s", config.mountpoint, exc)
        return 1
    fs.kernel.mounted = True
    log.info("mounted %s at %s (pid %d)", config.source.path, config.mountpoint, os.getpid())
    try:
        trio.run(_serve, config, fs, ready_fd, shutdown)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # After an outside (or lazy) unmount the kernel has already let go;
        # unmounting again would only make fusermount3 complain.
        still_mounted = find_mount(config.mountpoint) is not None
        pyfuse3.close(unmount=shutdown.requested and still_mounted)
        catalog.close()
    log.info("unmounted %s", config.mountpoint)
    return 0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class _Shutdown:
    requested: bool = False
    early_signal: int | None = None

    def remember(self, signum: int, frame: object) -> None:
        self.early_signal = signum


def _report(ready_fd: int | None, message: str) -> None:
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)


def notify_service_manager(state: str) -> None:
    """Tell systemd how the mount is (``Type=notify``: ``READY=1`` once it serves,
    ``STOPPING=1`` as it ends), if it started us; silently nothing otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.sendto(state.encode(), address)


async def _serve(
    config: MountConfig, fs: Filesystem, ready_fd: int | None, shutdown: _Shutdown
) -> None:
    try:
        await _serve_until_unmounted(config, fs, ready_fd, shutdown)
    finally:
        notify_service_manager("STOPPING=1")
        fs.stop()
        fs.graces.keep_all()


async def _serve_until_unmounted(
    config: MountConfig, fs: Filesystem, ready_fd: int | None, shutdown: _Shutdown
) -> None:
    async with trio.open_nursery() as nursery:

        async def fuse_loop() -> None:
            # pyfuse3.main returns when the session ends (a signal or an outside
            # unmount); nothing else in the nursery has a reason to live then.
            await pyfuse3.main(max_tasks=MAX_REQUESTS)
            nursery.cancel_scope.cancel()

        await nursery.start(_stop_on_signals, shutdown, fs)
        await nursery.start(fs.watcher.run)
        nursery.start_soon(fs.watcher.poll_databases)
        nursery.start_soon(fs.graces.run)
        if config.maintain_every and not config.read_only:
            nursery.start_soon(_maintain_periodically, config, fs)
        nursery.start_soon(_check_periodically, config, fs)
        nursery.start_soon(_flush_audit_periodically, fs)
        nursery.start_soon(_watch_for_unread_migrations, config)
        nursery.start_soon(fuse_loop)
        _report(ready_fd, "ready")
        notify_service_manager(
            f"READY=1\nSTATUS=serving {config.mountpoint}\nMAINPID={os.getpid()}"
        )


async def _maintain_periodically(config: MountConfig, fs: Filesystem) -> None:
    """``--maintain-every``: the same maintenance as the command, one log line per run."""
    mode = maintain.Mode(config.maintain_mode)
    while True:
        await trio.sleep(config.maintain_every or 0)
        try:
            # abandoned on unmount (it stops at its next key): a key locked by another
            # process must never keep the daemon from exiting
            results = await trio.to_thread.run_sync(
                lambda: maintain.maintain_source(
                    config.source, config.maintain_policy, mode, stop=fs.stopping
                ),
                abandon_on_cancel=True,
            )
        except OSError as exc:  # SessionFSError included: a readable reason
            log.error("maintenance failed: %s; trying again at the next run", describe_error(exc))
            continue
        except Exception as exc:
            # A background task never ends the mount: the sessions stay served.
            log.error("internal error in maintenance; trying again at the next run", exc_info=exc)
            continue
        summary = "; ".join(r.summary() for r in results) or "no stores"
        log.info("maintenance (%s): %s", config.maintain_mode, summary)


async def _flush_audit_periodically(fs: Filesystem) -> None:
    """Audit lines are appended in batches (history.AUDIT_FLUSH_SECONDS); the last of a
    burst must not wait in memory for the next change or the unmount."""
    while True:
        await trio.sleep(AUDIT_FLUSH_EVERY)
        try:
            await fs.editing.backings.thread(fs.editing.backings.catalog.flush_audit)
        except Exception as exc:  # never ends the mount; flush_audit says why once itself
            log.error("internal error appending audit lines", exc_info=exc)


async def _check_periodically(config: MountConfig, fs: Filesystem) -> None:
    """A read-only fsck in the background, so ``status`` can say what is wrong cheaply."""
    limiter = trio.CapacityLimiter(1)  # never more than one thread of the request pool's
    if not config.check_every:
        return
    # not while a fresh mount serves its first burst of requests
    await trio.sleep(min(CHECK_DELAY, config.check_every))

    def check() -> list[fsck.AgentCheck]:
        with contextlib.suppress(OSError):  # this thread only: requests keep the CPU first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return fsck.check_source(config.source)

    while True:
        try:
            checks = await trio.to_thread.run_sync(check, limiter=limiter, abandon_on_cancel=True)
        except OSError as exc:
            log.warning("background check failed: %s; trying again later", describe_error(exc))
        except Exception as exc:  # never ends the mount
            log.error("internal error in the background check; trying again later", exc_info=exc)
        else:
            summary = fsck.CheckSummary.of(checks, config.source.path)
            fs.control.last_check = summary
            if summary.problems:
                log.warning(
                    "background check: %d problem(s); run `sessionfs fsck %s` for details",
                    summary.problems,
                    config.source.path,
                )
        await trio.sleep(config.check_every)


async def _watch_for_unread_migrations(config: MountConfig) -> None:
    """Warn, once per file, when a gateway writes ``sessions.json`` beside ``sessions.d/``.

    That gateway does not read ``sessions.d/``: every session it creates from now
    on is invisible to the mount and vice versa, until the migration is undone.
    """
    warned: set[str] = set()  # agents warned about (again once it has gone and come back)
    limiter = trio.CapacityLimiter(1)
    while True:
        try:
            found = await trio.to_thread.run_sync(
                revert.unread_migrations, config.source, limiter=limiter, abandon_on_cancel=True
            )
        except Exception as exc:  # never ends the mount
            log.warning("could not look for unread migrations: %s", describe_error(exc))
            found = []
        for unread in found:
            if unread.agent.label not in warned:
                log.warning("%s", unread.message(config.source))
        warned = {unread.agent.label for unread in found}
        await trio.sleep(UNREAD_MIGRATION_CHECK_SECONDS)


async def _stop_on_signals(
    shutdown: _Shutdown,
    fs: Filesystem,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        if shutdown.early_signal is None:
            async for signum in signals:
                shutdown.early_signal = signum
                break
        signum = shutdown.early_signal or signal.SIGTERM
        log.info("%s received; unmounting", signal.Signals(signum).name)
        shutdown.requested = True
        fs.stop()  # requests waiting for a stuck key answer now, not at their deadline
        pyfuse3.terminate()


def unmount(path: Path, *, lazy: bool = False, timeout: float = UNMOUNT_WAIT) -> str:
    """``sessionfs umount``: unmount and wait for the daemon to exit.  Returns a notice."""
    entry = find_mount(path)
    if entry is None:
        raise MountError(f"{path} is not mounted")
    if entry.fstype != FS_TYPE:
        raise MountError(f"{path} is a {entry.fstype} mount, not a sessionfs one")
    pid = _daemon_pid(path)
    result = _fusermount("-u", *(["-z"] if lazy else []), entry.mountpoint)
    if result.returncode != 0:
        reason = result.stderr.strip()
        if "busy" in reason.lower():
            raise MountError(
                f"{path} is busy (a shell or program is using it); leave it and retry, "
                "or use --lazy to detach it now"
            )
        raise MountError(f"could not unmount {path}: {reason}")
    if pid is None:
        return f"unmounted {path} (its daemon was gone or did not answer)"
    if lazy:
        # Detached but still referenced, the connection lives on until the last
        # user leaves; the daemon is told to end it now.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise MountError(
                f"unmounted {path}, but daemon pid {pid} has not exited after {timeout:.0f} s"
            )
        time.sleep(0.02)
    return f"unmounted {path}"


def _log_of(mountpoint: Path) -> str:
    """Where the daemon logs (a daemon of an older sessionfs does not say)."""
    try:
        return control_line(mountpoint, "log")
    except FileNotFoundError:
        return "unknown"


def _unanswered(exc: OSError) -> str:
    """Why a mount's control files could not be read, in the user's words."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "another user's mount (without -o allow_other, only its owner may look in)"
    return f"the daemon does not answer ({exc.strerror})"


def list_mounts() -> str:
    """``sessionfs status`` without a mountpoint: every sessionfs mount this user can see."""
    lines = []
    for mountpoint in sessionfs_mounts():
        try:
            source = control_line(mountpoint, "source")
            pid = control_line(mountpoint, "pid")
            log_file = _log_of(mountpoint)
        except OSError as exc:
            lines.append(f"{mountpoint}: {_unanswered(exc)}")
            continue
        lines.append(f"{mountpoint}: source {source}, pid {pid}, log {log_file}")
    return "\n".join(lines) if lines else "no sessionfs mounts"


def status(path: Path) -> str:
    """``sessionfs status MOUNTPOINT``: per agent, what it serves and what went wrong.

    The daemon tells what only it knows (rejected writes, the background check); the
    era and the number of sessions are read from the store, as ``sessionfs ls`` does.
    """
    entry = find_mount(path)
    if entry is None or entry.fstype != FS_TYPE:
        raise MountError(f"{path} is not a sessionfs mount")
    try:
        source = control_line(path, "source")
        pid = control_line(path, "pid")
        log_file = _log_of(path)
        errors = read_control(path, "errors")
        stats = orjson.loads(read_control(path, "stats"))
        last_check = read_control(path, "fsck").strip()
    except OSError as exc:
        raise MountError(f"{path}: {_unanswered(exc)}") from None
    except orjson.JSONDecodeError:
        raise MountError(f"{path}: the daemon's statistics are not JSON") from None
    mode = "read-only" if entry.read_only else "read-write"
    lines = [f"{path}: {mode} sessionfs mount of {source} (daemon pid {pid}, log {log_file})"]
    try:
        rejected: dict[str, int] | None = stats["since_mount"]["rejected_writes"]["by_agent"]
        check = stats["last_check"]
        verdicts = {} if check is None else check["agents"]
    except (KeyError, TypeError):  # a daemon of an older sessionfs: it keeps no such counts
        rejected, check, verdicts = None, None, {}  # (its findings are still printed below)
    rows, warnings = [], []
    try:
        resolved = resolve(Path(source))
        agents = resolved.stores()
    except (SessionFSError, OSError) as exc:
        agents, resolved = [], None
        warnings.append(f"WARNING: the source cannot be read now: {describe_error(exc)}")
    for agent in agents:
        era = agent.era()
        try:
            sessions = listing.count_sessions(agent)
        except (SessionFSError, OSError) as exc:
            sessions = None
            warnings.append(f"WARNING: agent {agent.label}: not counted: {describe_error(exc)}")
        access = "read-write" if era is Era.DIRECTORY and not entry.read_only else "read-only"
        rows.append(
            (
                agent.label,
                era.value,
                access,
                "-" if sessions is None else f"{sessions:,}",
                "-"
                if rejected is None
                else str(rejected.get(agent.agent_id if agent.agent_id is not None else "", 0)),
                verdicts.get(
                    agent.label, "not yet" if check is None and rejected is not None else "-"
                ),
            )
        )
        if migrate.interrupted_reverts(agent) and resolved is not None:
            warnings.append(
                f"WARNING: agent {agent.label}: a revert was interrupted; finish it "
                f"(after unmounting): {revert.revert_command(resolved)}"
            )
    if resolved is not None:
        warnings += [f"WARNING: {u.message(resolved)}" for u in revert.unread_migrations(resolved)]
    header = ("AGENT", "ERA", "ACCESS", "SESSIONS", "REJECTED", "BACKGROUND CHECK")
    lines += listing.columns(header, rows, numeric={3, 4})
    lines.append(last_check)
    lines += warnings
    if errors:
        lines.append("recently rejected writes (newest last):")
        lines += [f"  {line}" for line in errors.splitlines()]
    else:
        lines.append("no rejected writes")
    return "\n".join(lines)


def _daemon_pid(path: Path) -> int | None:
    try:
        return int(read_control(path, "pid"))
    except (OSError, ValueError):
        return None  # dead or hung: unmounting does not need it
