"""A read-only view of a SQLite-era agent (``agents/<id>/agent/openclaw-agent.sqlite``).

OpenClaw 2026.7.2 and later keep every session entry as a row of ``session_nodes``
and every transcript event as a row of ``transcript_events``; the gateway is the
only writer.  This view shows those rows as the same files as the other eras, and
never writes: the database is opened read-only (``mode=ro``), never checkpointed
or vacuumed, and no file is created in the gateway's directory (but for the one
instant told below).  A WAL database
opened read-only needs its ``-wal`` and ``-shm`` files; when they do not exist
(the gateway is not running) it is opened ``immutable=1`` instead, and reopened
normally once they appear.  ``readonly_shm=1`` keeps SQLite from creating a
``-shm`` itself if the gateway closes between that check and the open (the open
then fails, and the database is read as immutable); an empty ``-wal`` may still
appear in that instant (SQLite gives it the database's owner when run as root).
Any other failure to open a live database is an error, never a silent fall back
to the main file without its WAL.

Each entry is served as migration writes JSON-era entries (2-space indent), the
same for every read-only view.  Its version is derived from its bytes (a CRC as
the inode number, ``updated_at`` as mtime, the byte length as size), so any change
of a row, even one that leaves ``updated_at`` alone, is a new version.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import zstandard

from . import entry as entry_rules
from .errors import EntryNotFound, ReadOnlyStore, SessionFSError
from .store import Snapshot

log = logging.getLogger("sessionfs")

SUPPORTED_SCHEMAS = frozenset({23})
BUSY_RETRIES = 50  # a SQLITE_BUSY is retried (10 ms apart), never surfaced at once
STAT_ROWS_AT_ONCE = 500  # rows whose entries one stat_many holds at a time
_T = TypeVar("_T")


class UnsupportedSchema(SessionFSError):
    """A database whose schema this version of sessionfs does not know how to read."""


class SqliteView:
    """The sessions of one agent's database; blocking calls, safe from any thread."""

    writable = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._immutable = False
        self._signature: tuple[int, int, int] | None = None  # the file when opened immutable
        self._data_version: tuple[int, int] | None = None
        self.problem: str | None = None  # why nothing is shown (an unknown schema)
        self._opened = 0  # connections opened so far
        self._shapes: dict[str, tuple[int, int]] = {}  # key -> (CRC of its row, shown size)
        self._newest = 0  # the newest updated_at seen by changed_keys()
        # every transcript's summary, and the data_version it was taken at
        self._transcripts_at: tuple[tuple[int, int], dict[str, Any]] | None = None
        self._seen_keys: set[str] = set()
        self._warned: set[str] = set()
        self._file_stat: os.stat_result | None = None

    # -- the connection --------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        wal = self.path.with_name(self.path.name + "-wal")
        shm = self.path.with_name(self.path.name + "-shm")
        live = wal.exists() and shm.exists()
        st = os.stat(self.path)
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._connection is not None:
            if live and not self._immutable:
                return self._connection  # WAL readers see every commit
            if not live and self._immutable and signature == self._signature:
                return self._connection  # nothing wrote the file since it was opened
            # the gateway started (its WAL appeared), or wrote and stopped: an immutable
            # connection would never see that, so open anew
            self._connection.close()
            self._connection = None
        self._signature = signature
        connection = None
        if live:
            try:
                connection = self._open("mode=ro&readonly_shm=1")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_CANTOPEN or shm.exists():
                    raise  # (with the -shm there, this is not the gateway having closed)
                # the gateway closed (and its -shm went) since we looked: a read-only
                # connection would have created one in its directory; this opens none
                log.debug("%s: reading it as immutable: %s", self.path, exc)
                live = False
        if connection is None:
            connection = self._open("immutable=1")
        self._connection, self._immutable = connection, not live
        self._opened += 1  # a new connection: data_version starts afresh
        return connection

    def _open(self, mode: str) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path))}?{mode}"
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=0.5)
        try:
            connection.execute("PRAGMA query_only = 1")
            self._check_schema(connection)  # also the first read: it maps the -shm
        except BaseException:
            connection.close()
            raise
        return connection

    def _check_schema(self, connection: sqlite3.Connection) -> None:
        (user_version,) = connection.execute("PRAGMA user_version").fetchone()
        try:
            row = connection.execute(
                "SELECT schema_version, app_version FROM schema_meta WHERE meta_key = 'primary'"
            ).fetchone()
        except sqlite3.DatabaseError:
            row = None
        version = row[0] if row else None
        if user_version not in SUPPORTED_SCHEMAS or version not in SUPPORTED_SCHEMAS:
            known = ", ".join(str(v) for v in sorted(SUPPORTED_SCHEMAS))
            raise UnsupportedSchema(
                f"{self.path}: schema {version!r} (user_version {user_version}) is not one "
                f"sessionfs reads (it knows {known}); nothing of this agent is shown"
            )

    def _query(self, run: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *run* on the connection, retrying while the gateway holds the database busy."""
        for attempt in range(BUSY_RETRIES):
            with self._lock:
                try:
                    return run(self._connect())
                except sqlite3.DatabaseError as exc:  # corrupt, not a database, schema drift
                    busy = isinstance(exc, sqlite3.OperationalError) and (
                        "locked" in str(exc) or "busy" in str(exc)
                    )
                    if not busy:
                        self._warn_once(f"cannot read {self.path}: {exc}")
                        raise SessionFSError(f"{self.path}: {exc}") from None
                    if attempt == BUSY_RETRIES - 1:
                        raise SessionFSError(f"{self.path}: busy for too long ({exc})") from None
            time.sleep(0.01)
        raise AssertionError("unreachable")

    def _warn_once(self, message: str) -> None:
        """A failing query answers EIO to every reader: say why, once per cause."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def changed(self) -> bool:
        """Whether anything may have been committed since the last call.

        Cheap: ``PRAGMA data_version`` on the open connection; a reopened
        connection (the gateway started) counts as a change.
        """
        try:
            mark = self._query(
                lambda c: (self._opened, c.execute("PRAGMA data_version").fetchone()[0])
            )
        except SessionFSError:
            return True
        before, self._data_version = self._data_version, mark
        return before is not None and before != mark

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # -- entries ---------------------------------------------------------------

    def _rows(self, keys: list[str]) -> list[tuple[str, str, int]]:
        """``(key, entry_json, updated_at)`` of *keys* that have a row."""

        def fetch(connection: sqlite3.Connection) -> list[tuple[str, str, int]]:
            found: list[tuple[str, str, int]] = []
            for first in range(0, len(keys), 500):
                chunk = keys[first : first + 500]
                marks = ",".join("?" * len(chunk))
                found += connection.execute(
                    "SELECT session_key, entry_json, updated_at FROM session_nodes "
                    f"WHERE session_key IN ({marks})",
                    chunk,
                ).fetchall()
            return found

        try:
            return self._query(fetch)
        except UnsupportedSchema as exc:
            self._unsupported(exc)
            return []

    def _shape(self, key: str, entry_json: str) -> tuple[int, int]:
        """The version identity (a CRC of the row's JSON) and shown size of a row.

        Only these two numbers are kept per key (not the bytes: a mount of a big
        database must stay small); a row is pretty-printed again only when it changed.
        """
        raw_crc = zlib.crc32(entry_json.encode())
        cached = self._shapes.get(key)
        if cached is None or cached[0] != raw_crc:
            cached = self._shapes[key] = (raw_crc, len(_pretty(entry_json)))
        return cached

    def _unsupported(self, exc: UnsupportedSchema) -> None:
        if self.problem != str(exc):
            log.warning("%s", exc)
        self.problem = str(exc)

    def _entry_stat(self, identity: int, size: int, updated_at: int) -> os.stat_result:
        file_stat = self._database_stat()
        mtime_ns = int(updated_at) * 1_000_000
        fields = (
            stat.S_IFREG | 0o400,
            identity,  # a new version whenever the row's JSON changes
            file_stat.st_dev,
            1,
            file_stat.st_uid,
            file_stat.st_gid,
            size,
        )
        seconds = mtime_ns // 1_000_000_000
        return os.stat_result(
            (*fields, seconds, seconds, seconds),
            {"st_atime_ns": mtime_ns, "st_mtime_ns": mtime_ns, "st_ctime_ns": mtime_ns},
        )

    def read(self, key: str) -> Snapshot:
        for _, entry_json, updated_at in self._rows([key]):
            data = _pretty(entry_json)
            identity = zlib.crc32(entry_json.encode())
            self._shapes[key] = (identity, len(data))
            return Snapshot(data, self._entry_stat(identity, len(data), updated_at))
        raise EntryNotFound(f"no session {key!r}")

    def stat(self, key: str) -> os.stat_result:
        (found,) = self.stat_many([key])
        if found is None:
            raise EntryNotFound(f"no session {key!r}")
        return found

    def keys(self) -> list[str]:
        try:
            rows = self._query(
                lambda c: c.execute("SELECT session_key FROM session_nodes").fetchall()
            )
        except UnsupportedSchema as exc:
            self._unsupported(exc)
            return []
        keys = [key for (key,) in rows]
        if len(self._shapes) > len(keys):  # sessions went: forget them
            present = set(keys)
            self._shapes = {k: v for k, v in self._shapes.items() if k in present}
        return keys

    def stat_many(self, keys: list[str]) -> list[os.stat_result | None]:
        # A chunk of rows at a time: the watcher's full look asks for every key, and
        # every row's JSON at once (~50 MB for 10,000 sessions) stayed in the daemon's
        # resident memory afterwards
        found: dict[str, os.stat_result] = {}
        for first in range(0, len(keys), STAT_ROWS_AT_ONCE):
            for key, entry_json, at in self._rows(keys[first : first + STAT_ROWS_AT_ONCE]):
                found[key] = self._entry_stat(*self._shape(key, entry_json), at)
        return [found.get(key) for key in keys]

    def changed_keys(self) -> list[str]:
        """Keys whose rows may have changed since the last call, cheaply.

        The gateway's entry writer sets ``updated_at`` with every entry it writes,
        so rows at or after the newest ``updated_at`` seen, and keys that came or
        went, are all that can differ (a row changed without it is caught by the
        watcher's periodic full look).
        """

        def fetch(connection: sqlite3.Connection) -> tuple[list[str], list[str]]:
            recent = connection.execute(
                "SELECT session_key FROM session_nodes WHERE updated_at >= ?", (self._newest,)
            ).fetchall()
            every = connection.execute("SELECT session_key FROM session_nodes").fetchall()
            newest = connection.execute("SELECT MAX(updated_at) FROM session_nodes").fetchone()
            self._newest = newest[0] or 0
            return [k for (k,) in recent], [k for (k,) in every]

        try:
            recent, every = self._query(fetch)
        except UnsupportedSchema as exc:
            self._unsupported(exc)
            return []
        now = set(every)
        came_or_went = now ^ self._seen_keys
        self._seen_keys = now
        return sorted(set(recent) | came_or_went)

    def session_id(self, key: str) -> str | None:
        """The key's current ``sessionId`` (whose events are its transcript)."""
        row = self._query(
            lambda c: c.execute(
                "SELECT current_session_id FROM session_nodes WHERE session_key = ?", (key,)
            ).fetchone()
        )
        return None if row is None else str(row[0])

    def transcript_chunk(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[tuple[int, bytes]]:
        """Events of *session_id* after *after_seq*, in order, each as one ``.jsonl`` line."""
        rows = self._query(
            lambda c: c.execute(
                "SELECT seq, event_json, event_zstd, event_utf8_bytes FROM transcript_events "
                "WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (session_id, after_seq, limit),
            ).fetchall()
        )
        try:
            return [(seq, _event_line(session_id, seq, *event)) for seq, *event in rows]
        except SessionFSError as exc:  # answered EIO: say why in the log too
            self._warn_once(str(exc))
            raise

    def why_read_only(self) -> str:
        return (
            f"{self.path} is OpenClaw's own database, shown read-only (a row changed from "
            "outside is marked invalid until `openclaw doctor --fix`); change sessions "
            "through OpenClaw"
        )

    # -- transcripts -------------------------------------------------------------

    def transcript_stats(self, keys: list[str]) -> list[tuple[str, os.stat_result, int] | None]:
        """Per key: its current session id, a stat and the byte size of its transcript
        (every event's JSON and a newline); None for a session without events.

        For many keys (a listing) every session is summed in one query, and the result
        is kept until the next commit (``data_version``, as the watcher polls it).
        """
        if len(keys) > 50:
            summary = self._all_transcripts()
            return [summary.get(key) for key in keys]

        def fetch(connection: sqlite3.Connection) -> list[tuple[str, str, int, int, int]]:
            found = []
            for first in range(0, len(keys), 500):
                chunk = keys[first : first + 500]
                marks = ",".join("?" * len(chunk))
                found += connection.execute(
                    _TRANSCRIPTS + f"WHERE n.session_key IN ({marks}) GROUP BY n.session_key",
                    chunk,
                ).fetchall()
            return found

        try:
            found = self._summaries(self._query(fetch))
        except UnsupportedSchema as exc:
            self._unsupported(exc)
            return [None] * len(keys)
        return [found.get(key) for key in keys]

    def _all_transcripts(self) -> dict[str, tuple[str, os.stat_result, int]]:
        mark, cached = self._data_version, self._transcripts_at
        if mark is not None and cached is not None and cached[0] == mark:
            return cached[1]  # nothing was committed since it was taken
        try:
            rows = self._query(
                lambda c: c.execute(_TRANSCRIPTS + "GROUP BY n.session_key").fetchall()
            )
        except UnsupportedSchema as exc:
            self._unsupported(exc)
            return {}
        summary = self._summaries(rows)
        if mark is not None:
            self._transcripts_at = (mark, summary)
        return summary

    def _summaries(
        self, rows: list[tuple[str, str, int, int, int]]
    ) -> dict[str, tuple[str, os.stat_result, int]]:
        stats = {}
        for key, session_id, count, octets, created_at in rows:
            size = octets + count
            stats[key] = (session_id, self._synthetic_stat(size, created_at, session_id), size)
        return stats

    def _database_stat(self) -> os.stat_result:
        """The database file's owner and device, for the files shown (taken once)."""
        if self._file_stat is None:
            self._file_stat = os.stat(self.path)
        return self._file_stat

    def _synthetic_stat(self, size: int, at_ms: int, identity: str) -> os.stat_result:
        file_stat = self._database_stat()
        mtime_ns = int(at_ms) * 1_000_000
        seconds = mtime_ns // 1_000_000_000
        fields = (
            stat.S_IFREG | 0o400,
            zlib.crc32(identity.encode()),
            file_stat.st_dev,
            1,
            file_stat.st_uid,
            file_stat.st_gid,
            size,
        )
        return os.stat_result(
            (*fields, seconds, seconds, seconds),
            {"st_atime_ns": mtime_ns, "st_mtime_ns": mtime_ns, "st_ctime_ns": mtime_ns},
        )

    def open_transcript(self, session_id: str) -> SqliteTranscript:
        return SqliteTranscript(self, session_id)

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise ReadOnlyStore(self.why_read_only())

    write = delete = remove = rename = update = _refuse


class SqliteTranscript:
    """One session's events as the ``.jsonl`` they replaced; the same calls as a file's.

    An index of each event's offset is built at open and extended as events are
    added (``tail -f``), so a read at any offset fetches only the rows it needs.
    """

    def __init__(self, view: SqliteView, session_id: str) -> None:
        self.view = view
        self.session_id = session_id
        # byte offset and seq of each event, in seq order: 16 bytes an event, not ~80
        self._starts = array.array("q")
        self._seqs = array.array("q")
        self._end = 0
        self._extend()

    def _extend(self) -> None:
        def index(connection: sqlite3.Connection) -> None:
            # from what is indexed now: a retry after SQLITE_BUSY continues, never repeats
            after = self._seqs[-1] if self._seqs else -(2**63)
            cursor = connection.execute(
                f"SELECT seq, {_EVENT_BYTES} + 1 FROM transcript_events "
                "WHERE session_id = ? AND seq > ? ORDER BY seq",
                (self.session_id, after),
            )
            for seq, size in cursor:  # streamed: never every row at once
                self._seqs.append(seq)
                self._starts.append(self._end)
                self._end += size

        self.view._query(index)

    def complete_size(self) -> int:
        self._extend()
        return self._end

    def read(self, offset: int, size: int) -> bytes:
        if offset + size > self._end:
            self._extend()
        if offset >= self._end or size <= 0:
            return b""
        first = bisect.bisect_right(self._starts, offset) - 1
        # only the events the asked bytes lie in: a compressed one is decompressed
        # only when read, and a corrupt one fails only the reads that reach it
        last = bisect.bisect_left(self._starts, offset + size) - 1
        wanted = last - first + 1
        out = bytearray()
        seq_from = self._seqs[first]
        skip = offset - self._starts[first]
        while wanted > 0 and len(out) < skip + size:
            chunk = self.view.transcript_chunk(self.session_id, seq_from - 1, min(wanted, 256))
            if not chunk:
                break
            for _, line in chunk:
                out += line
            wanted -= len(chunk)
            seq_from = chunk[-1][0] + 1
        return bytes(out[skip : skip + size])

    def close(self) -> None:
        pass


# An event's bytes in the .jsonl: its JSON's UTF-8 length, or for one stored
# compressed the length the gateway recorded (the schema requires it), so sizes and
# offsets are known without decompressing anything.
_EVENT_BYTES = "COALESCE(length(CAST(event_json AS BLOB)), event_utf8_bytes, 0)"
_TRANSCRIPTS = (
    "SELECT n.session_key, n.current_session_id, COUNT(e.seq), "
    f"COALESCE(SUM({_EVENT_BYTES.replace('event_', 'e.event_')}), 0), "
    "COALESCE(MAX(e.created_at), 0) "
    "FROM session_nodes n JOIN transcript_events e ON e.session_id = n.current_session_id "
)
MAX_EVENT_BYTES = 4 * 1024 * 1024  # the schema's bound on one event


def _event_line(
    session_id: str, seq: int, event_json: str | None, zstd: bytes | None, size: int | None
) -> bytes:
    """One event as its ``.jsonl`` line; a compressed one decompressed (``event_zstd``).

    A compressed event that does not decompress to the size the gateway recorded
    would shift every later offset of the file: it is an error, never a guess.
    """
    if event_json is not None:
        return event_json.encode() + b"\n"
    if zstd is None:
        return b"\n"  # (the schema allows neither; a blank line keeps offsets whole)
    if size is None or not 1 <= size <= MAX_EVENT_BYTES:
        raise SessionFSError(f"transcript {session_id}: event {seq} has no valid recorded size")
    # A frame may claim any size: never allocate more than the recorded one.
    try:
        claimed = zstandard.frame_content_size(zstd)  # -1: not in the frame header
        if claimed not in (-1, size):
            raise SessionFSError(
                f"transcript {session_id}: event {seq} claims {claimed} bytes, "
                f"not the {size} recorded"
            )
        # (one decompressor per call: they may not be shared between threads)
        data = zstandard.ZstdDecompressor().decompress(zstd, max_output_size=size)
    except (zstandard.ZstdError, MemoryError) as exc:
        raise SessionFSError(
            f"transcript {session_id}: event {seq} does not decompress: {exc}"
        ) from None
    if len(data) != size:
        raise SessionFSError(
            f"transcript {session_id}: event {seq} decompresses to {len(data)} bytes, "
            f"not the {size} recorded"
        )
    return data + b"\n"


def _pretty(entry_json: str) -> bytes:
    with contextlib.suppress(ValueError):
        value: Any = entry_rules.loads(entry_json.encode())
        return entry_rules.dumps(value)
    return entry_json.encode()
