"""Find the session stores under a SOURCE.

A SOURCE is a state dir (every ``agents/<id>/sessions/``), one sessions dir (holding
``sessions.json`` and/or ``sessions.d/``), a ``sessions.d/`` directory itself, or a
``sessions.json`` path.  Agent and sessions dirs reached through a symlink are
reported and skipped, never followed.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NoStore, describe_error
from .mounts import control_line, mount_holding, source_of

LEGACY_FILE = "sessions.json"
ENTRIES_DIR = "sessions.d"
REVERTED_PREFIX = "sessions.d.reverted."  # where `migrate --revert` moves sessions.d/
AGENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class SourceKind(enum.Enum):
    STATE_DIR = "state dir"
    SESSIONS_DIR = "sessions dir"
    ENTRIES_DIR = "sessions.d dir"
    LEGACY_FILE = "sessions.json file"


class Era(enum.Enum):
    """Which OpenClaw store an agent's sessions live in (see the eras reference)."""

    SQLITE = "SQLite era"
    DIRECTORY = "directory era"
    JSON = "JSON era"
    NONE = "no store"


SQLITE_DB = Path("agent") / "openclaw-agent.sqlite"


@dataclass(frozen=True)
class AgentStore:
    """One agent's sessions dir and the two stores it may hold."""

    sessions_dir: Path
    agent_id: str | None = None

    @property
    def legacy(self) -> Path:
        return self.sessions_dir / LEGACY_FILE

    @property
    def entries(self) -> Path:
        return self.sessions_dir / ENTRIES_DIR

    @property
    def label(self) -> str:
        return self.agent_id if self.agent_id is not None else str(self.sessions_dir)

    def has_legacy(self) -> bool:
        return self.legacy.is_file() and not self.legacy.is_symlink()

    def has_entries(self) -> bool:
        return self.entries.is_dir() and not self.entries.is_symlink()

    def has_store(self) -> bool:
        """Whether there is anything to show: a database, a sessions.d/ or a sessions.json."""
        return self.has_database() or self.has_entries() or self.has_legacy()

    def has_database(self) -> bool:
        return self.database.is_file() and not self.database.is_symlink()

    @property
    def database(self) -> Path:
        """The agent's SQLite store (``agents/<id>/agent/openclaw-agent.sqlite``)."""
        return self.sessions_dir.parent / SQLITE_DB

    @property
    def owner(self) -> str | None:
        """The agent whose keys this store holds, when it is known."""
        return self.agent_id if self.agent_id is not None else agent_of(self.sessions_dir)

    def era(self) -> Era:
        """Decided once, here: a database wins (its sessions.json is only import input)."""
        if self.has_database():
            return Era.SQLITE
        if self.has_entries():
            return Era.DIRECTORY
        if self.has_legacy() or self.legacy.is_symlink():
            return Era.JSON
        return Era.NONE


@dataclass
class Source:
    kind: SourceKind
    path: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def agents_dir(self) -> Path:
        return self.path / "agents"

    def stores(self) -> list[AgentStore]:
        """The stores under this source right now (state dirs change while mounted)."""
        if self.kind is SourceKind.STATE_DIR:
            stores, self.skipped = scan_agents(self.agents_dir)
            return stores
        if self.kind is SourceKind.ENTRIES_DIR:
            return [AgentStore(self.path.parent)]
        if self.kind is SourceKind.LEGACY_FILE:
            return [AgentStore(self.path.parent)]
        return [AgentStore(self.path)]


def agent_of(sessions_dir: Path) -> str | None:
    """The agent whose sessions dir this is (``agents/<id>/sessions``), if it is one."""
    agent = sessions_dir.parent
    if sessions_dir.name == "sessions" and agent.parent.name == "agents":
        return agent.name if AGENT_ID_RE.match(agent.name) else None
    return None


def default_source() -> Path:
    state = os.environ.get("OPENCLAW_STATE_DIR")
    return Path(state).expanduser() if state else Path.home() / ".openclaw"


def resolve(source: str | os.PathLike[str] | None) -> Source:
    """Classify *source*; raises :class:`NoStore` with advice when it holds no store."""
    path = Path(source).expanduser() if source is not None else default_source()
    try:
        path = _through_mount(path.absolute())
        return _classify(path)
    except PermissionError:
        raise NoStore(f"{path}: permission denied (sessionfs runs as uid {os.geteuid()})") from None


def _classify(path: Path) -> Source:
    if agent_of(path) is not None and not path.is_file() and AgentStore(path).has_database():
        return Source(SourceKind.SESSIONS_DIR, path)  # a SQLite-era agent's, made or not
    if path.is_file():
        if path.name == LEGACY_FILE:
            return Source(SourceKind.LEGACY_FILE, path)
        raise NoStore(f"{path} is a file but not a {LEGACY_FILE}")
    if not path.is_dir():
        raise NoStore(
            f"{path} does not exist; pass a state dir, a sessions dir or a sessions.json "
            "(the default is $OPENCLAW_STATE_DIR, else ~/.openclaw)"
        )
    if (path / "agents").is_dir():
        return Source(SourceKind.STATE_DIR, path)
    if path.name == ENTRIES_DIR:
        return Source(SourceKind.ENTRIES_DIR, path)
    if (path / LEGACY_FILE).exists() or (path / ENTRIES_DIR).exists():
        return Source(SourceKind.SESSIONS_DIR, path)
    if any(path.glob(f"{REVERTED_PREFIX}*")):  # (a revert to finish, or a finished one)
        return Source(SourceKind.SESSIONS_DIR, path)
    raise NoStore(
        f"{path} holds no session store: expected agents/<id>/sessions/, "
        f"{LEGACY_FILE} or {ENTRIES_DIR}/"
    )


def _through_mount(path: Path) -> Path:
    """A mountpoint (or a directory in a mount) as SOURCE stands for the mount's source.

    A sessionfs mount shows a state dir's agents as its top directories, so
    ``MOUNTPOINT/<agent>`` is that agent's sessions dir; deeper paths name no store.
    """
    held = mount_holding(path)
    if held is None:
        return path
    entry, inside = held
    mountpoint = Path(entry.mountpoint)
    origin = source_of(entry)  # the mount table names it
    if origin is None:
        try:
            origin = Path(control_line(mountpoint, "source"))
        except OSError as exc:
            raise NoStore(
                f"{mountpoint} is a sessionfs mount whose daemon does not answer "
                f"({describe_error(exc)}); give its source instead"
            ) from None
    if not inside.parts:
        return origin
    agent = origin / "agents" / inside.parts[0]
    if len(inside.parts) == 1 and AgentStore(agent / "sessions").has_store():
        return agent / "sessions"  # (a SQLite-era agent's may not exist: its database does)
    raise NoStore(f"{path} is inside the sessionfs mount {mountpoint} but is no store of it")


def scan_agents(agents_dir: Path) -> tuple[list[AgentStore], list[tuple[str, str]]]:
    """Every ``agents/<id>/sessions/`` that is a real directory, and what was skipped (why)."""
    stores: list[AgentStore] = []
    skipped: list[tuple[str, str]] = []
    for agent_id, reason in _agent_dirs(agents_dir):
        if reason is not None:
            skipped.append((agent_id, reason))
        else:
            stores.append(AgentStore(agents_dir / agent_id / "sessions", agent_id))
    return stores, skipped


def agent_problem(agent_dir: Path) -> str | None:
    """Why ``agents/<id>`` is not an agent with a real sessions dir; None if it is one.

    An empty string means "not worth reporting" (a plain file, no sessions dir yet).
    """
    if agent_dir.is_symlink():
        return "agent dir is a symlink; not followed"
    if not agent_dir.is_dir():
        return ""
    if not AGENT_ID_RE.match(agent_dir.name):
        return f"not an agent id ({AGENT_ID_RE.pattern})"
    sessions = agent_dir / "sessions"
    if sessions.is_symlink():
        return "sessions dir is a symlink; not followed"
    database = agent_dir / SQLITE_DB
    if database.is_file() and not database.is_symlink():
        return None  # a SQLite-era agent needs no sessions dir
    return None if sessions.is_dir() else ""


def _agent_dirs(agents_dir: Path) -> Iterator[tuple[str, str | None]]:
    try:
        names = sorted(os.listdir(agents_dir))
    except FileNotFoundError:
        return
    for name in names:
        problem = agent_problem(agents_dir / name)
        if problem != "":
            yield name, problem
