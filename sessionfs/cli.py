"""The ``sessionfs`` command: argument parsing and exit codes; the work is done elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
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
        for line in report.lines():
            print(line)
    return 0 if migrate.all_ok(reports) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build_demo_state

    state = Path(args.state).expanduser()
    if not (state / "agents").exists():
        build_demo_state(state)
    print(f"demo state: {state}")
    for report in migrate.migrate_source(sources.resolve(state)):
        print("\n".join(report.lines()))
    return _cmd_ls(argparse.Namespace(source=str(state)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionfs",
        description="OpenClaw's session store as plain files.",
    )
    parser.add_argument("--version", action="version", version=f"sessionfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = commands.add_parser("ls", help="list the sessions of every store under SOURCE")
    ls.add_argument("source", nargs="?", help=SOURCE_HELP)
    ls.set_defaults(func=_cmd_ls)

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

    demo = commands.add_parser("demo", help="build a demo JSON-era state and show it")
    demo.add_argument("--state", default="~/.local/share/sessionfs-demo/state")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="sessionfs: %(message)s")
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
