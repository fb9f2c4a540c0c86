"""The ``sessionfs`` command: argument parsing and exit codes; the work is done elsewhere."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from . import __version__, fsck, maintain, migrate, sources
from .errors import NoStore, SessionFSError, describe_error
from .fs.editing import LOCK_TIMEOUT
from .history import KEEP_NEWEST, KEEP_SECONDS, Retention
from .shell import quote

log = logging.getLogger("sessionfs")

SOURCE_HELP = (
    "a state dir, a sessions dir, a sessions.d/ or a sessions.json "
    "(default: $OPENCLAW_STATE_DIR, else ~/.openclaw)"
)
MOUNT_OPTIONS = {
    "ro": "read-only: every write answers EROFS; nothing is migrated or maintained",
    "rw": "read-write (the default)",
    "allow_other": "let other users see the mount (needs user_allow_other in /etc/fuse.conf)",
    "conflict=lww|fail": "when an entry open for editing changed behind the mount, the later "
    "commit wins and the log says so (lww, the default), or the commit fails with ESTALE (fail)",
    "no_auto_unmount": "leave a dead mount behind if the daemon dies (for debugging)",
    "lock_timeout=SECONDS": "how long a write waits for a session another process has locked "
    "before it fails with EBUSY (default 30)",
    "check_every=SECONDS": "how often the daemon runs a read-only fsck in the background, for "
    "`sessionfs status` (default 3600; the first after 30 s or SECONDS if sooner; 0: never)",
    "uid=N,gid=N": "who owns the files and directories the mount shows (default: the "
    "daemon's user and group); the store's files keep their owner",
    "default_permissions,auto_unmount": "always on (accepted, for fstab lines copied from "
    "other FUSE filesystems)",
}
_SECONDS = "SECONDS"
_ID = "ID"
_OPTION_VALUES: dict[str, set[str] | str | None] = {
    "ro": None,
    "rw": None,
    "allow_other": None,
    "no_auto_unmount": None,
    "conflict": {"lww", "fail"},
    "lock_timeout": _SECONDS,
    "check_every": _SECONDS,
    "uid": _ID,
    "gid": _ID,
    "default_permissions": None,
    "auto_unmount": None,
}
_ID_MAX = 2**32 - 2  # (uid_t; -1 means "unchanged" to chown)
# Options of mount(8) itself, which an /etc/fstab line or `mount -t fuse.sessionfs` may
# pass on (mount.fuse3 adds dev and suid): accepted and left alone.
_MOUNT_ITSELF = frozenset(
    {
        "defaults", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
        "user", "nouser", "users", "owner", "nofail", "_netdev", "async", "sync", "atime",
        "noatime", "relatime", "strictatime", "lazytime", "diratime", "nodiratime",
    }
)  # fmt: skip
_MOUNT_ITSELF_PREFIXES = ("x-", "X-", "comment=", "setuid=")
DEMO_STATE = Path("~/.local/share/sessionfs/demo-state")
DEMO_MOUNTPOINT = Path("~/sessionfs-demo")


def _cmd_ls(args: argparse.Namespace) -> int:
    from . import listing

    result = listing.list_source(sources.resolve(args.source), agent_id=args.agent)
    if args.agent is not None and not result.summaries:
        args.parser.error(f"no agent {args.agent!r} in this SOURCE")
    rows = listing.sorted_rows(result.rows, args.sort)
    if args.limit is not None:
        rows = rows[: args.limit]
    for problem in result.problems:
        print(f"sessionfs: {problem}", file=sys.stderr)
    if args.json:
        for line in listing.json_lines(rows):
            sys.stdout.buffer.write(line + b"\n")
        sys.stdout.flush()
        return 0
    print("\n".join(result.summaries))
    if rows:
        print("\n".join(listing.table(rows)))
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    source = sources.resolve(args.source)
    if not args.dry_run and not args.revert:  # (a revert refuses a mounted agent itself)
        _refuse_if_mounted(source, "a migration")
    if args.revert:
        from .revert import revert_source

        reports = revert_source(source, dry_run=args.dry_run, lock_timeout=args.lock_timeout)
    else:
        reports = migrate.migrate_source(
            source, dry_run=args.dry_run, lock_timeout=args.lock_timeout
        )
    if not reports:
        print(f"{source.path}: no agents with a sessions dir")
    for report in reports:
        print("\n".join(report.lines()))
    return 0 if migrate.all_ok(reports) else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_source
    from .store import write_file_atomically

    result = export_source(
        sources.resolve(args.source), agent_id=args.agent, sessions_d=args.sessions_d
    )
    for line in result.notes + result.problems:
        print(f"sessionfs: {line}", file=sys.stderr)
    data = result.dumps()
    if args.output is None or args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        target = Path(os.path.realpath(Path(args.output).expanduser()))
        try:
            write_file_atomically(target.parent, target.name, data)
        except OSError as exc:
            print(f"sessionfs: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 1
    return 1 if result.problems else 0


def _parse_mount_options(parser: argparse.ArgumentParser, values: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for opt in (o.strip() for value in values for o in value.split(",")):
        if not opt:
            continue
        name, _, value = opt.partition("=")
        if name in _MOUNT_ITSELF or opt.startswith(_MOUNT_ITSELF_PREFIXES):
            continue
        if name not in _OPTION_VALUES:
            parser.error(f"unknown mount option {opt!r}; known: {', '.join(MOUNT_OPTIONS)}")
        allowed = _OPTION_VALUES[name]
        if allowed == _SECONDS:
            if not re.fullmatch(r"\d+(\.\d+)?", value):
                parser.error(f"mount option {opt!r}: expected {name}=SECONDS (a number)")
        elif allowed == _ID:
            if not re.fullmatch(r"\d{1,10}", value) or int(value) > _ID_MAX:
                parser.error(f"mount option {opt!r}: expected {name}=N (0 to {_ID_MAX})")
        elif (allowed is None) != (value == "") or (allowed is not None and value not in allowed):
            parser.error(
                f"mount option {opt!r}: expected {name}"
                + (f"={'|'.join(sorted(allowed))}" if allowed else "")
            )
        options[name] = value
    return options


def _cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import CHECK_EVERY, MountConfig, mount

    if len(args.paths) > 2:
        args.parser.error("give at most SOURCE and MOUNTPOINT")
    source_arg, mountpoint = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    from .mounts import mount_holding

    if source_arg is not None and mount_holding(Path(source_arg).expanduser()) is not None:
        raise SessionFSError(f"{source_arg} is (in) a sessionfs mount: mount its source instead")
    options = _parse_mount_options(args.parser, args.options)
    if "ro" in options and "rw" in options:
        args.parser.error("mount options ro and rw contradict each other")
    if "ro" in options and args.maintain_every:
        args.parser.error("a read-only mount (-o ro) is never maintained: drop --maintain-every")
    config = MountConfig(
        source=sources.resolve(source_arg),
        mountpoint=Path(mountpoint).expanduser(),
        foreground=args.foreground,
        migrate=not args.no_migrate and "ro" not in options,
        read_only="ro" in options,
        allow_other="allow_other" in options,
        auto_unmount="no_auto_unmount" not in options,
        debug=args.debug,
        log_file=Path(args.log).expanduser() if args.log else None,
        conflict=options.get("conflict", "lww"),
        lock_timeout=float(options.get("lock_timeout", LOCK_TIMEOUT)),
        check_every=float(options.get("check_every", CHECK_EVERY)),
        maintain_every=args.maintain_every,
        maintain_mode=args.maintain_mode,
        maintain_policy=_policy(args),
        uid=int(options["uid"]) if "uid" in options else None,
        gid=int(options["gid"]) if "gid" in options else None,
    )
    return mount(config)


def _cmd_umount(args: argparse.Namespace) -> int:
    from .daemon import unmount

    print(unmount(Path(args.mountpoint).expanduser(), lazy=args.lazy))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .daemon import list_mounts, status
    from .mounts import mount_holding

    if args.mountpoint is None:
        print(list_mounts())
        return 0
    path = Path(args.mountpoint).expanduser()
    held = mount_holding(path)  # (a directory inside a mount stands for the mount)
    print(status(path if held is None else Path(held[0].mountpoint)))
    return 0


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` (or ``1.5d``) in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 90m or 45s")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def size(text: str) -> int:
    """``500MB``, ``2GiB``, ``10k`` or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB, 2GiB or 10000")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def count(text: str) -> int:
    """A number of entries: a whole number, zero or more."""
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (a whole number, 0 or more)")
    return int(text)


def percent(text: str) -> float:
    """A share in percent, above 0 and at most 100."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage above 0 and up to 100")
    return value


def _policy(args: argparse.Namespace) -> maintain.Policy:
    return maintain.Policy(
        prune_after_ms=int(args.prune_after * 1000),
        max_entries=args.max_entries,
        max_disk_bytes=args.max_disk_bytes,
        high_water_percent=args.high_water,
        history=Retention(args.history_keep, args.history_age, enabled=not args.no_history),
    )


def _mounted_refusal(source: sources.Source, what: str) -> str | None:
    from .daemon import mounted_refusal

    return mounted_refusal(source.path, what)


def _refuse_if_mounted(source: sources.Source, what: str) -> None:
    refusal = _mounted_refusal(source, what)
    if refusal is not None:
        raise SessionFSError(refusal)


def _cmd_maintain(args: argparse.Namespace) -> int:
    source = sources.resolve(args.source)
    if args.mode == "enforce" and not args.dry_run:
        _refuse_if_mounted(source, "maintain --mode enforce")
    results = maintain.maintain_source(
        source, _policy(args), maintain.Mode(args.mode), dry_run=args.dry_run
    )
    for result in results:
        print("\n".join(result.lines()))
    if any(r.error for r in results):
        return 3
    return 1 if any(r.changes for r in results) else 0


def _cmd_fsck(args: argparse.Namespace) -> int:
    source = sources.resolve(args.source)
    refusal = _mounted_refusal(source, "a repair") if args.repair else None
    if refusal is not None:
        print(f"sessionfs: {refusal}", file=sys.stderr)
        return 3  # (fsck's own status for "could not check")
    checks = fsck.check_source(source, repair=args.repair)
    if not checks:
        print(f"{source.path}: no agents with a sessions dir")
    for check in checks:
        print("\n".join(check.lines()))
    return fsck.exit_code(checks)


def _cmd_show_paths(args: argparse.Namespace) -> int:
    if len(args.paths) > 2:
        args.parser.error("expected [SOURCE] KEY")
    args.source, args.key = (None, *args.paths) if len(args.paths) == 1 else args.paths
    return _cmd_show(args)


def _cmd_show(args: argparse.Namespace) -> int:
    from . import show

    source = sources.resolve(args.source)
    try:
        if args.history:
            print("\n".join(show.history(source, args.key, agent_id=args.agent)))
            return 0
        on_terminal = sys.stdout.isatty()
        fmt = args.format or ("text" if on_terminal else "md")
        for text in show.show(
            source, args.key, agent_id=args.agent, fmt=fmt, colour=on_terminal and fmt == "text"
        ):
            sys.stdout.write(text)
    except show.UsageError as exc:
        print(f"sessionfs: {exc}", file=sys.stderr)
        return 2
    return 0


def _source_and_key(
    args: argparse.Namespace, changes: str | None = None
) -> tuple[sources.Source, str]:
    """SOURCE and KEY; a command that *changes* the store refuses a read-only mount's
    mountpoint as SOURCE (whoever was handed that mount was not handed the store)."""
    if len(args.paths) > 2:
        args.parser.error("expected [SOURCE] KEY")
    source, key = (None, *args.paths) if len(args.paths) == 1 else args.paths
    if changes is not None and source is not None:
        from .mounts import mount_holding

        held = mount_holding(Path(source).expanduser())
        if held is not None and held[0].read_only:
            raise SessionFSError(
                f"{source} is in a read-only mount; {changes} changes the store: give the "
                "store's own path if that is meant"
            )
    return sources.resolve(source), key


def _cmd_history(args: argparse.Namespace) -> int:
    from . import undo
    from .show import UsageError

    source, key = _source_and_key(args, "history --purge" if args.purge else None)
    try:
        if args.purge:
            print(f"{key}: removed {undo.purge(source, key, agent_id=args.agent)} kept versions")
            return 0
        kept = undo.versions(source, key, agent_id=args.agent)
    except UsageError as exc:
        print(f"sessionfs: {exc}", file=sys.stderr)
        return 2
    if not kept:
        print(f"{key}: no kept versions")
    for version in kept:
        print(f"{version.when}  {version.size:>8} bytes  (current until then)")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from . import undo
    from .show import UsageError

    source, key = _source_and_key(args, "restore")
    try:
        at = undo.parse_time(args.at) if args.at is not None else None
        restored = undo.restore(source, key, at=at, agent_id=args.agent)
    except UsageError as exc:
        print(f"sessionfs: {exc}", file=sys.stderr)
        return 2
    print(
        f"{key}: restored the version current until {restored.version.when} "
        "(the one it replaced is kept: this restore can be undone too)"
    )
    return 0


def _cmd_log(args: argparse.Namespace) -> int:
    from . import changelog
    from .show import UsageError

    try:
        found = changelog.changes(sources.resolve(args.source), args.key, agent_id=args.agent)
    except UsageError as exc:
        print(f"sessionfs: {exc}", file=sys.stderr)
        return 2
    for change in found[: args.limit] if args.limit else found:
        if args.json:
            sys.stdout.buffer.write(change.json() + b"\n")
        else:
            print(change.line())
    sys.stdout.flush()
    return 0


def _answers(mountpoint: Path) -> bool:
    """Whether a mount is alive (a dead one says "Transport endpoint is not connected")."""
    try:
        os.stat(mountpoint)
    except OSError:
        return False
    return True


def _cmd_demo(args: argparse.Namespace) -> int:
    from .daemon import MountConfig, is_mounted, mount
    from .demo import build_demo_state

    state = Path(args.state).expanduser()
    mountpoint = Path(args.mountpoint).expanduser()
    if not (state / "agents").exists():
        build_demo_state(state)
        print(f"built a JSON-era demo state (2 agents, 50 sessions) in {state}")
    if is_mounted(mountpoint) and _answers(mountpoint):
        print(f"the demo is already mounted at {mountpoint}")
    else:
        with contextlib.suppress(FileExistsError):  # exist_ok would stat a dead mount and fail
            mountpoint.mkdir(parents=True)
        code = mount(MountConfig(source=sources.resolve(state), mountpoint=mountpoint))
        if code:
            return code
    print(_demo_tour(mountpoint, state, _cli_as_typed()))
    return 0


def _cli_as_typed() -> str:
    """How to run this very sessionfs from any directory, for commands printed to paste.

    `sessionfs` when the PATH finds this one; else its full path (the quick start runs
    ``.venv/bin/sessionfs``); else the interpreter with ``-m`` (``python -m sessionfs``).
    """
    invoked = Path(sys.argv[0]).absolute()
    if invoked.name == "__main__.py" or not invoked.is_file():
        return f"{quote(sys.executable)} -m sessionfs"
    on_path = shutil.which("sessionfs")
    if on_path is not None and Path(on_path).resolve() == invoked.resolve():
        return "sessionfs"
    return quote(invoked)


def _demo_tour(mountpoint: Path, state: Path, cli: str) -> str:
    """Commands that each work as pasted, on the demo mount and the store behind it."""
    m = quote(mountpoint)
    store = quote(state / "agents" / "main" / "sessions" / "sessions.d")
    models = (
        f"jq -r .model {m}/main/*.json | sort | uniq -c"
        if shutil.which("jq")
        else f'grep -ho \'"model": "[^"]*"\' {m}/main/*.json | sort | uniq -c'
    )
    return f"""
Every session is a file named by its key. Try:
  {cli} ls {m}
  ls -lt {m}/main | head -5
  cat {m}/main/agent:main:main.json
  {models}
  grep -l telegram {m}/*/*.json
  {cli} status {m}
  ls {store} | head -3     # the store behind it
When done:
  {cli} umount {m}"""


def _maintenance_options() -> argparse.ArgumentParser:
    """The policy options shared by `maintain` and `mount --maintain-every`."""
    shared = argparse.ArgumentParser(add_help=False)
    group = shared.add_argument_group("maintenance policy (OpenClaw's defaults)")
    group.add_argument(
        "--prune-after",
        type=duration,
        default=duration("30d"),
        metavar="AGE",
        help="remove entries not updated for this long (default 30d)",
    )
    group.add_argument(
        "--max-entries",
        type=count,
        default=500,
        metavar="N",
        help="keep at most N entries, the newest (default 500)",
    )
    group.add_argument(
        "--max-disk-bytes",
        type=size,
        default=None,
        metavar="SIZE",
        help="disk budget for the whole sessions dir (default: none)",
    )
    group.add_argument(
        "--high-water",
        type=percent,
        default=80.0,
        metavar="PERCENT",
        help="above this share of the budget, free space down to it (default 80)",
    )
    kept = shared.add_argument_group("kept versions (sessions.d/.history)")
    kept.add_argument(
        "--history-keep",
        type=count,
        default=KEEP_NEWEST,
        metavar="N",
        help="keep the N newest versions of each session (default 20)",
    )
    kept.add_argument(
        "--history-age",
        type=duration,
        default=KEEP_SECONDS,
        metavar="AGE",
        help="and every version younger than this; a removed session's for this long (default 30d)",
    )
    kept.add_argument(
        "--no-history",
        action="store_true",
        help="keep no versions of what changes (the audit goes on; kept ones stay until "
        "they age out)",
    )
    return shared


def build_parser() -> tuple[argparse.ArgumentParser, frozenset[str]]:
    """The command line, and the names of its commands."""
    parser = argparse.ArgumentParser(
        prog="sessionfs",
        description="OpenClaw's session store as plain files: sessions.d/ and a FUSE mount.",
    )
    parser.add_argument("--version", action="version", version=f"sessionfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    policy = _maintenance_options()
    mnt = commands.add_parser(
        "mount",
        parents=[policy],
        help="mount the sessions under SOURCE at MOUNTPOINT",
        description="Mount every session under SOURCE as a JSON file named by its key. Legacy "
        "sessions.json stores are migrated first. Returns once the mount is ready.",
        epilog="mount options (-o): "
        + "; ".join(f"{name}: {text}" for name, text in MOUNT_OPTIONS.items()),
    )
    mnt.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT", help=SOURCE_HELP)
    mnt.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    mnt.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not migrate; show unmigrated agents read-only from sessions.json",
    )
    mnt.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated mount options (see below)",
    )
    mnt.add_argument("--debug", action="store_true", help="log a line per request")
    mnt.add_argument("--log", metavar="FILE", help="log here (default: ~/.local/state/sessionfs/)")
    mnt.add_argument(
        "--maintain-every",
        type=duration,
        metavar="INTERVAL",
        help="run maintenance in the daemon this often, e.g. 1h (default: never)",
    )
    mnt.add_argument(
        "--maintain-mode",
        choices=["warn", "enforce"],
        default="warn",
        help="what background maintenance does (default warn: log the plan)",
    )
    mnt.set_defaults(func=_cmd_mount, parser=mnt)

    umnt = commands.add_parser(
        "umount",
        help="unmount and wait for the daemon to exit",
        description="Unmount a sessionfs mount and wait for its daemon to exit.",
    )
    umnt.add_argument("mountpoint")
    umnt.add_argument("--lazy", action="store_true", help="detach now even if the mount is busy")
    umnt.set_defaults(func=_cmd_umount)

    st = commands.add_parser(
        "status",
        help="show a mount and the writes it rejected lately",
        description="Show what a sessionfs mount serves and its most recent rejected writes "
        "(a shell redirect exits 0 even when sessionfs refuses the content).",
    )
    st.add_argument(
        "mountpoint", nargs="?", help="a sessionfs mount; without it, every mount is listed"
    )
    st.set_defaults(func=_cmd_status)

    mig = commands.add_parser(
        "migrate",
        help="migrate legacy sessions.json stores to sessions.d/",
        description="Migrate every legacy sessions.json under SOURCE to sessions.d/, one agent at "
        "a time, keeping the old file as sessions.json.bak.<epoch-ms>. Safe to run again.",
    )
    mig.add_argument("source", nargs="?", help=SOURCE_HELP)
    mig.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    mig.add_argument(
        "--revert",
        action="store_true",
        help="undo: rebuild sessions.json from sessions.d/ (merged with a sessions.json the "
        "gateway wrote since), keeping sessions.d/ as sessions.d.reverted.<epoch-ms>",
    )
    mig.add_argument(
        "--lock-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a gateway's sessions.json.lock (default 10)",
    )
    mig.set_defaults(func=_cmd_migrate)

    hst = commands.add_parser(
        "history",
        help="list the kept versions of a session (every change keeps the one it replaces)",
        description="List the versions of KEY that stopped being current, oldest first: "
        "sessions.d/.history/<file>/<time>.json. --purge removes them all at once.",
    )
    hst.add_argument("paths", nargs="+", metavar="[SOURCE] KEY", help=SOURCE_HELP)
    hst.add_argument("--agent", metavar="ID", help="the agent, for keys without agent:<id>:")
    hst.add_argument("--purge", action="store_true", help="remove every kept version of KEY")
    hst.set_defaults(func=_cmd_history, parser=hst)

    rst = commands.add_parser(
        "restore",
        help="bring back the newest kept version of a session (also of a removed one)",
        description="Write back the newest kept version of KEY, or with --at the one that was "
        "current at that time, as a normal commit (the version it replaces is kept in turn).",
        epilog="exit status: 0 restored, 1 nothing to restore, 2 usage error",
    )
    rst.add_argument("paths", nargs="+", metavar="[SOURCE] KEY", help=SOURCE_HELP)
    rst.add_argument("--at", metavar="TIME", help="ISO time (UTC) or epoch seconds")
    rst.add_argument("--agent", metavar="ID", help="the agent, for keys without agent:<id>:")
    rst.set_defaults(func=_cmd_restore, parser=rst)

    lg = commands.add_parser(
        "log",
        help="the changes of one session or of all, newest first: when, who, what, which fields",
        description="The changes of every session of SOURCE (or of --key KEY), newest first: "
        "time, who (program[pid] and uid, from the audit of changes made through the mount, "
        "by maintain and by restore; 'outside' for a kept version no audit line names), what "
        "(written, renamed, removed, restored, removed by maintenance) and which top-level "
        "fields changed.",
        epilog="exit status: 0 listed, 1 no recorded change of KEY, 2 usage error",
    )
    lg.add_argument("source", nargs="?", help=SOURCE_HELP)
    lg.add_argument("--key", metavar="KEY", help="only this session's changes")
    lg.add_argument("--agent", metavar="ID", help="only this agent's sessions")
    lg.add_argument("--limit", type=count, default=0, metavar="N", help="at most N changes")
    lg.add_argument("--json", action="store_true", help="one JSON object per change")
    lg.set_defaults(func=_cmd_log, parser=lg)

    exp = commands.add_parser(
        "export",
        help="print every session of SOURCE as one JSON document (any era)",
        description="Export the sessions of SOURCE, whatever its era (SQLite database, "
        "sessions.d/ or sessions.json), as JSON: {key: entry} for one agent (the shape of "
        "sessions.json), {agentId: {key: entry}} for a state dir. Nothing is written to a store.",
        epilog="exit status: 0 exported, 1 some sessions could not be read (named on stderr), "
        "2 usage error",
    )
    exp.add_argument("source", nargs="?", help=SOURCE_HELP)
    exp.add_argument("--agent", metavar="ID", help="only this agent, as {key: entry}")
    exp.add_argument(
        "--sessions-d",
        action="store_true",
        help="read sessions.d/ even where a SQLite database took over (after an upgrade)",
    )
    exp.add_argument("-o", "--output", metavar="FILE", help="write here (atomically), not stdout")
    exp.set_defaults(func=_cmd_export)

    mtn = commands.add_parser(
        "maintain",
        parents=[policy],
        help="prune, cap and keep a disk budget on sessions.d/, like OpenClaw",
        description="Plan maintenance for every store under SOURCE: prune stale entries, cap the "
        "count, keep the disk budget, archive the transcripts of removed entries. warn (the "
        "default) prints the plan; enforce carries it out, one locked delete at a time.",
        epilog="exit status: 0 nothing to remove, 1 something was (or would be) removed, "
        "2 usage error, 3 an agent failed",
    )
    mtn.add_argument("source", nargs="?", help=SOURCE_HELP)
    mtn.add_argument(
        "--mode",
        choices=["warn", "enforce"],
        default="warn",
        help="warn: print the plan (default); enforce: carry it out",
    )
    mtn.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    mtn.set_defaults(func=_cmd_maintain, failed=3)

    demo = commands.add_parser(
        "demo",
        help="build a demo JSON-era state and mount it",
        description="Build a realistic JSON-era OpenClaw state (2 agents, about 50 sessions), "
        "migrate and mount it, and print commands to try.",
    )
    demo.add_argument(
        "mountpoint",
        nargs="?",
        default=str(DEMO_MOUNTPOINT),
        help=f"where to mount (default {DEMO_MOUNTPOINT})",
    )
    demo.add_argument(
        "--state", default=str(DEMO_STATE), help=f"demo state dir (default {DEMO_STATE})"
    )
    demo.set_defaults(func=_cmd_demo)

    chk = commands.add_parser(
        "fsck",
        help="check every store under SOURCE; --repair quarantines what no gateway can read",
        description="Check every directory-era and JSON-era store under SOURCE and report each "
        "problem on one line. With --repair, move what no gateway could read into "
        "sessions.d/.quarantine/<time>/ (never delete it), remove stray temp files, migration "
        "staging and stale locks, and complete an interrupted migration. SQLite-era agents "
        "are never touched.",
        epilog="exit status: 0 clean, 1 something was found, 2 usage error, 3 could not check "
        "(or the store is mounted and --repair was asked)",
    )
    chk.add_argument("source", nargs="?", help=SOURCE_HELP)
    chk.add_argument("--repair", action="store_true", help="repair what is safe to repair")
    chk.set_defaults(func=_cmd_fsck, failed=3)

    shw = commands.add_parser(
        "show",
        help="print a session's transcript (Markdown, text or the raw lines)",
        description="Print the transcript of session KEY for a person: Markdown (the default "
        "when stdout is not a terminal), coloured text on a terminal, or the raw JSONL lines. "
        "Every era is read; nothing is written.",
        epilog="exit status: 0 printed, 1 no such session or transcript, 2 usage error",
    )
    shw.add_argument("paths", nargs="+", metavar="[SOURCE] KEY", help=SOURCE_HELP)
    shw.add_argument("--format", choices=["md", "text", "jsonl"], help="how to print it")
    shw.add_argument("--history", action="store_true", help="list earlier transcripts instead")
    shw.add_argument("--agent", metavar="ID", help="the agent, for keys without agent:<id>:")
    shw.set_defaults(func=_cmd_show_paths, parser=shw)

    ls = commands.add_parser(
        "ls",
        help="list the sessions of every store under SOURCE, newest first",
        description="A table of every session (any era): key, agent, updated, channel, "
        "model, tokens; --json prints one object per session instead.",
    )
    ls.add_argument("source", nargs="?", help=SOURCE_HELP)
    ls.add_argument("--json", action="store_true", help="one JSON object per session")
    ls.add_argument("--agent", metavar="ID", help="only this agent")
    ls.add_argument(
        "--sort", choices=["updated", "key", "tokens"], default="updated", help="(default updated)"
    )
    ls.add_argument("--limit", type=count, metavar="N", help="at most N sessions")
    ls.set_defaults(func=_cmd_ls, parser=ls)
    return parser, frozenset(commands.choices)


def _as_mount_helper(commands: frozenset[str], argv: list[str]) -> list[str]:
    """``sessionfs SOURCE MOUNTPOINT -o OPTIONS``, as mount.fuse3 runs it for
    ``mount -t fuse.sessionfs`` and /etc/fstab, is ``sessionfs mount SOURCE MOUNTPOINT``."""
    positional = [arg for arg in argv[:2] if not arg.startswith("-")]
    # (a SOURCE is a path: a mistyped command stays one, for argparse to name)
    looks_like_path = "/" in argv[0] or os.path.lexists(argv[0]) if argv else False
    if len(positional) == 2 and argv[0] not in commands and looks_like_path:
        return ["mount", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # keys and file names that are not valid UTF-8 print escaped, never as a traceback
            stream.reconfigure(errors="backslashreplace")
    parser, commands = build_parser()
    args = parser.parse_args(_as_mount_helper(commands, sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="sessionfs: %(message)s")
    try:
        code: int = args.func(args)
    except NoStore as exc:  # a SOURCE that holds no store: a usage error, as argparse's
        print(f"sessionfs: {exc}", file=sys.stderr)
        return 2
    except SessionFSError as exc:
        print(f"sessionfs: {exc}", file=sys.stderr)
        return int(getattr(args, "failed", 1))
    except BrokenPipeError:  # (an OSError too: before the catch-all below)
        # `sessionfs ls | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a store this user may not read, a disk that fails: one line
        print(f"sessionfs: {describe_error(exc)}", file=sys.stderr)
        return int(getattr(args, "failed", 1))
    return code


if __name__ == "__main__":
    sys.exit(main())
