"""The ``sessionfs`` command: argument parsing and exit codes; the work is done elsewhere."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__, sources
from .errors import SessionFSError
from .keys import key_to_display
from .store import SessionStore

log = logging.getLogger("sessionfs")


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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build_demo_state

    state = Path(args.state).expanduser()
    if not (state / "agents").exists():
        build_demo_state(state)
    print(f"demo state: {state}")
    return _cmd_ls(argparse.Namespace(source=str(state)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionfs",
        description="OpenClaw's session store as plain files.",
    )
    parser.add_argument("--version", action="version", version=f"sessionfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = commands.add_parser("ls", help="list the sessions of every store under SOURCE")
    ls.add_argument("source", nargs="?", help="state dir, sessions dir or sessions.json")
    ls.set_defaults(func=_cmd_ls)

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
    return code


if __name__ == "__main__":
    sys.exit(main())
