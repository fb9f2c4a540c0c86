"""The ``sessionfs`` command: argument parsing and exit codes; the work is done elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from . import __version__, migrate, sources
from .errors import SessionFSError
from .keys import key_to_display
from .store import SessionStore

log = logging.getLogger("sessionfs")

SOURCE_HELP = (
    "a state dir, a sessions dir, a sessions.d/ or a sessions.json "
    "(default: $OPENCLAW_STATE_DIR, else ~/.openclaw)"
)
MOUNT_OPTIONS = {
    "allow_other": "let other users see the mount (needs user_allow_other in /etc/fuse.conf)",
    "conflict=lww|fail": "when an entry open for editing changed behind the mount, the later "
    "commit wins and the log says so (lww, the default), or the commit fails with ESTALE (fail)",
    "no_auto_unmount": "leave a dead mount behind if the daemon dies (for debugging)",
}
_OPTION_VALUES = {"allow_other": None, "no_auto_unmount": None, "conflict": {"lww", "fail"}}
DEMO_STATE = Path("~/.local/share/sessionfs/demo-state")
DEMO_MOUNTPOINT = Path("~/sessionfs-demo")


def _cmd_ls(args: argparse.Namespace) -> int:
    source = sources.resolve(args.source)
    for store_ref in source.stores():
        if not store_ref.has_entries():
            print(f"{store_ref.label}: no sessions.d/ yet (run `sessionfs migrate`)")
            continue
        with SessionStore(store_ref.entries, create=False) as store:
            keys = sorted(store.keys())
        print(f"{store_ref.label}: {len(keys)} sessions")
        for key in keys:
            print(f"  {key_to_display(key)}")
    for name, reason in source.skipped:
        print(f"{name}: skipped: {reason}", file=sys.stderr)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    source = sources.resolve(args.source)
    reports = migrate.migrate_source(source, dry_run=args.dry_run, lock_timeout=args.lock_timeout)
    if not reports:
        print(f"{source.path}: no agents with a sessions dir")
    for report in reports:
        print("\n".join(report.lines()))
    return 0 if migrate.all_ok(reports) else 1


def _parse_mount_options(parser: argparse.ArgumentParser, values: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for opt in (o.strip() for value in values for o in value.split(",")):
        if not opt:
            continue
        name, _, value = opt.partition("=")
        if name not in _OPTION_VALUES:
            parser.error(f"unknown mount option {opt!r}; known: {', '.join(MOUNT_OPTIONS)}")
        allowed = _OPTION_VALUES[name]
        if (allowed is None) != (value == "") or (allowed is not None and value not in allowed):
            parser.error(
                f"mount option {opt!r}: expected {name}"
                + (f"={'|'.join(sorted(allowed))}" if allowed else "")
            )
        options[name] = value
    return options


def _cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import MountConfig, mount

    if len(args.paths) > 2:
        args.parser.error("give at most SOURCE and MOUNTPOINT")
    source_arg, mountpoint = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    options = _parse_mount_options(args.parser, args.options)
    config = MountConfig(
        source=sources.resolve(source_arg),
        mountpoint=Path(mountpoint).expanduser(),
        foreground=args.foreground,
        migrate=not args.no_migrate,
        allow_other="allow_other" in options,
        auto_unmount="no_auto_unmount" not in options,
        debug=args.debug,
        log_file=Path(args.log).expanduser() if args.log else None,
        conflict=options.get("conflict", "lww"),
    )
    return mount(config)


def _cmd_umount(args: argparse.Namespace) -> int:
    from .daemon import unmount

    print(unmount(Path(args.mountpoint).expanduser(), lazy=args.lazy))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .daemon import status

    print(status(Path(args.mountpoint).expanduser()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .daemon import FS_TYPE, MountConfig, find_mount, mount
    from .demo import build_demo_state

    state = Path(args.state).expanduser()
    mountpoint = Path(args.mountpoint).expanduser()
    if not (state / "agents").exists():
        build_demo_state(state)
        print(f"built a JSON-era demo state (2 agents, 50 sessions) in {state}")
    mounted = find_mount(mountpoint)
    if mounted is not None and mounted.fstype == FS_TYPE:
        print(f"the demo is already mounted at {mountpoint}")
    else:
        mountpoint.mkdir(parents=True, exist_ok=True)
        code = mount(MountConfig(source=sources.resolve(state), mountpoint=mountpoint))
        if code:
            return code
    m = shlex.quote(str(mountpoint))
    print(f"""
Every session is a file named by its key. Try:
  ls {m}/main
  cat {m}/main/agent:main:main.json
  jq -r '.model' {m}/main/*.json | sort | uniq -c
  grep -l telegram {m}/*/*.json
  ls {state}/agents/main/sessions/sessions.d | head -3     # the store behind it
When done:
  sessionfs umount {m}""")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionfs",
        description="OpenClaw's session store as plain files: sessions.d/ and a FUSE mount.",
    )
    parser.add_argument("--version", action="version", version=f"sessionfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mnt = commands.add_parser(
        "mount",
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
    st.add_argument("mountpoint")
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
        "--lock-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a gateway's sessions.json.lock (default 10)",
    )
    mig.set_defaults(func=_cmd_migrate)

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

    ls = commands.add_parser("ls", help="list the sessions of every store under SOURCE")
    ls.add_argument("source", nargs="?", help=SOURCE_HELP)
    ls.set_defaults(func=_cmd_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="sessionfs: %(message)s")
    try:
        code: int = args.func(args)
    except SessionFSError as exc:
        print(f"sessionfs: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `sessionfs ls | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
