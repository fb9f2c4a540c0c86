"""sessionfs benchmarks: every workload against its baselines, in one run.

Baselines measured in the same run: the JSON-era monolithic store (OpenClaw's write
path modelled with orjson), the store API without FUSE (native), plain files, and a
do-nothing pyfuse3 filesystem (scripts/nullfs.py).  Prints a table of targets and
writes every raw figure as JSON.  Never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import multiprocessing
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from sessionfs.daemon import is_mounted
from sessionfs.demo import make_entry, write_legacy_store
from sessionfs.entry import dumps
from sessionfs.keys import key_to_filename
from sessionfs.locking import openclaw_store_lock
from sessionfs.migrate import migrate_store
from sessionfs.sources import AgentStore
from sessionfs.store import SessionStore

REPO = Path(__file__).resolve().parent.parent
KEY = "agent:bench:webchat:direct:{}"
BASE_MS = 1_764_000_000_000


@dataclass
class Target:
    name: str
    value: float
    unit: str
    target: str
    met: bool


@dataclass
class Plan:
    quick: bool
    sizes: tuple[int, ...]
    update_samples: int
    monolithic_samples: dict[int, int]
    read_samples: int
    contention_seconds: float
    migration_entries: int
    visibility_samples: int
    rss_entries: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        sizes = (1_000, 10_000, 100_000)
        if quick:  # no monolithic baseline at 100,000 (an update takes seconds); shorter runs
            return cls(
                quick=True,
                sizes=sizes,
                update_samples=100,
                monolithic_samples={1_000: 30, 10_000: 8, 100_000: 0},
                read_samples=1_000,
                contention_seconds=1.5,
                migration_entries=10_000,
                visibility_samples=50,
                rss_entries=100_000,
            )
        return cls(
            quick=False,
            sizes=sizes,
            update_samples=400,
            monolithic_samples={1_000: 100, 10_000: 30, 100_000: 5},
            read_samples=5_000,
            contention_seconds=8.0,
            migration_entries=100_000,
            visibility_samples=200,
            rss_entries=100_000,
        )


# -- measuring ---------------------------------------------------------------


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def sample(fn: Callable[[], object], count: int, warmup: int = 5) -> list[float]:
    return sample_prepared(lambda: fn, count, warmup)


def sample_prepared(
    prepare: Callable[[], Callable[[], object]], count: int, warmup: int = 5
) -> list[float]:
    """Times of *count* calls, each made by *prepare* untimed just before (the data
    a writer has ready when it starts an update is not part of the update)."""
    for _ in range(warmup):
        prepare()()
    out = []
    for _ in range(count):
        call = prepare()
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def sample_alternately(
    prepares: dict[str, Callable[[], Callable[[], object]]],
    count: int,
    block: int = 25,
    warmup: int = 3,
) -> dict[str, list[float]]:
    """Like :func:`sample_prepared` for each of *prepares*, taken in alternating blocks
    of *block* calls: a ratio of two of them then compares calls made under the same
    conditions (a VM's fsync latency drifts by 2x within seconds), not two stretches
    of time.  Calls follow each other as in :func:`sample_prepared` (a pause before
    each one makes every fsync pay for waking an idle CPU); the first *warmup* calls
    of each block are not timed, so no call pays for what the other kind left running."""
    out: dict[str, list[float]] = {name: [] for name in prepares}
    while any(len(times) < count for times in out.values()):
        for name, prepare in prepares.items():
            left = count - len(out[name])
            if left > 0:
                out[name] += sample_prepared(prepare, min(block, left), warmup=warmup)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": pct(samples, 50) * 1e3,
        "p99_ms": pct(samples, 99) * 1e3,
        "mean_ms": sum(samples) / len(samples) * 1e3,
        "n": len(samples),
    }


# -- building stores ---------------------------------------------------------


# Entries as large as the smallest per-session size users reported for the JSON-era
# store (2,423 sessions = 11.7 MB, about 4.8 KB each; others reported 80-230 KB):
# most of it is the skills snapshot, which lists every skill the agent has.
ENTRY_BYTES = 4800
_SKILL = "- {name}: {text}\n"
_SKILL_TEXT = "Use when the user asks about {topic}; read SKILL.md in the skill folder first."


def _skills_prompt(rng: random.Random, size: int) -> str:
    lines = ["You can use these skills:\n"]
    while sum(map(len, lines)) < size:
        topic = rng.choice(("calendars", "email", "git", "weather", "notes", "home automation"))
        lines.append(
            _SKILL.format(
                name=f"skill-{rng.randrange(10**6)}", text=_SKILL_TEXT.format(topic=topic)
            )
        )
    return "".join(lines)


def entry_bytes(i: int, version: int = 0) -> bytes:
    rng = random.Random(i)
    entry = make_entry(rng, KEY.format(i), BASE_MS + i)
    entry["skillsSnapshot"] = {"prompt": _skills_prompt(rng, ENTRY_BYTES - 800)}
    return dumps({**entry, "updatedAt": BASE_MS + version})


def build_store(sessions_dir: Path, count: int, *, legacy: bool = True) -> None:
    """sessions.d/ with *count* realistic entries, and (*legacy*) the same as a sessions.json."""
    sessions_dir.mkdir(parents=True)
    entries: dict[str, Any] = {}
    with SessionStore(sessions_dir / "sessions.d") as store:
        for i in range(count):
            data = entry_bytes(i)
            store.create_unlocked(KEY.format(i), data)
            if legacy:
                entries[KEY.format(i)] = orjson.loads(data)
        store.sync()
    if legacy:
        data = orjson.dumps(entries, option=orjson.OPT_INDENT_2)
        (sessions_dir / "sessions.json").write_bytes(data)


def monolithic_update(path: Path, key: str, version: int) -> None:
    """OpenClaw's JSON-era write path: whole file, one lock, temp + fsync + rename."""
    with openclaw_store_lock(path):
        store = orjson.loads(path.read_bytes())
        store[key] = {**store[key], "updatedAt": BASE_MS + version}
        data = orjson.dumps(store, option=orjson.OPT_INDENT_2)
        temp = path.with_name(f"{path.name}.{uuid.uuid4()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_via_path(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_via_path(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


# -- mounts ------------------------------------------------------------------


@contextlib.contextmanager
def mounted(
    argv: list[str], mountpoint: Path, fstype: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    deadline = time.monotonic() + 120
    while not is_mounted(mountpoint, fstype):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv[:4]} did not mount: {log.read_text()[-2000:]}")
        time.sleep(0.01)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def sessionfs_mount(
    source: Path, mountpoint: Path, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    argv = [
        sys.executable,
        "-m",
        "sessionfs",
        "mount",
        "-f",
        "--no-migrate",
        str(source),
        str(mountpoint),
    ]
    return mounted(argv, mountpoint, "fuse.sessionfs", log)


def null_mount(
    mountpoint: Path,
    count: int,
    size: int,
    log: Path,
    mode: str = "cached",
    store: Path | None = None,
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """scripts/nullfs.py; *store* (a ``sessions.d/``) for the "commit" mode."""
    argv = [
        sys.executable,
        str(REPO / "scripts" / "nullfs.py"),
        str(mountpoint),
        str(count),
        str(size),
        mode,
        *([str(store)] if store is not None else []),
    ]
    return mounted(argv, mountpoint, "fuse.nullfs", log)


def mount_name(i: int) -> str:
    return KEY.format(i) + ".json"


# -- workloads ---------------------------------------------------------------


def bench_updates(plan: Plan, work: Path, figures: dict[str, Any]) -> None:
    """1. one update: through the mount, the store API, a null FUSE fs, the monolithic store.

    The null FUSE filesystem (scripts/nullfs.py, "commit") stores each close with the
    store API in its request handler: the floor for any filesystem in front of it."""
    out: dict[str, Any] = {}
    for size in plan.sizes:
        out[str(size)] = row = _updates_at(plan, work, size)
        mono = f"{row['monolithic']['p50_ms']:.1f} ms" if "monolithic" in row else "not run"
        print(
            f"  update at {size:>7,} sessions: mount {row['mount']['p50_ms']:.2f} ms, "
            f"store API {row['store_api']['p50_ms']:.2f} ms, "
            f"null FUSE committing {row['null_fuse']['p50_ms']:.2f} ms, monolithic {mono} (p50)",
            flush=True,
        )
    figures["update"] = out


def _updates_at(plan: Plan, work: Path, size: int) -> dict[str, Any]:
    sessions = work / f"store-{size}" / "sessions"
    started = time.perf_counter()
    with_legacy = plan.monolithic_samples[size] > 0
    build_store(sessions, size, legacy=with_legacy)
    built = time.perf_counter() - started
    index = size // 2
    key = KEY.format(index)
    version = iter(range(1, 10**9))
    # the store API writes to a same-sized copy, so the daemon sees none of its events;
    # a real copy: with the files hard-linked between the two, the mount's update at
    # 100,000 sessions took 2x as long
    native_entries = work / f"store-{size}-native" / "sessions.d"
    shutil.copytree(sessions / "sessions.d", native_entries, symlinks=True)
    os.sync()  # the build's writeback must not land in the samples' fsyncs
    # the floor of any filesystem in front of the store: a null FUSE filesystem whose
    # close commits with the same store call (into the store API's copy)
    null_mnt = work / f"mnt-null-commit-{size}"
    with (
        SessionStore(native_entries) as store,
        sessionfs_mount(sessions, work / f"mnt-{size}", work / f"mount-{size}.log"),
        null_mount(null_mnt, size, 0, work / f"null-commit-{size}.log", "commit", native_entries),
    ):
        path = str(work / f"mnt-{size}" / mount_name(index))
        null_path = str(null_mnt / mount_name(index))
        taken = sample_alternately(
            {
                "store_api": lambda: functools.partial(
                    store.write, key, entry_bytes(index, next(version))
                ),
                "mount": lambda: functools.partial(
                    write_via_path, path, entry_bytes(index, next(version))
                ),
                "null_fuse": lambda: functools.partial(
                    write_via_path, null_path, entry_bytes(index, next(version))
                ),
            },
            plan.update_samples,
        )
    row = {"build_s": built, **{name: summary(times) for name, times in taken.items()}}
    if with_legacy:
        legacy = sessions / "sessions.json"
        mono = sample(
            lambda: monolithic_update(legacy, key, next(version)),
            plan.monolithic_samples[size],
            warmup=1,
        )
        row["monolithic"] = summary(mono)
    return row


def _writer(kind: str, target: str, index: int, seconds: float, start_at: float) -> list[float]:
    """One writer process: update its own session until the time is up; its latencies."""
    key = KEY.format(index)
    while time.time() < start_at:
        time.sleep(0.001)
    latencies, version = [], 0
    store = SessionStore(target) if kind == "native" else None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        version += 1
        begin = time.perf_counter()
        if kind == "mount":
            write_via_path(os.path.join(target, mount_name(index)), entry_bytes(index, version))
        elif kind == "native":
            assert store is not None
            store.write(key, entry_bytes(index, version))
        else:
            monolithic_update(Path(target), key, version)
        latencies.append(time.perf_counter() - begin)
    return latencies


def run_writers(kind: str, target: str, indexes: list[int], seconds: float) -> list[list[float]]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(indexes)) as pool:
        start_at = time.time() + 1.0  # every process started before anyone writes
        jobs = [pool.apply_async(_writer, (kind, target, i, seconds, start_at)) for i in indexes]
        return [job.get(seconds + 120) for job in jobs]


def bench_contention(plan: Plan, work: Path, figures: dict[str, Any]) -> None:
    """2. eight writers on eight sessions; and writer A's p99 while B is hammered."""
    sessions = work / "store-1000" / "sessions"
    mnt = work / "mnt-contention"
    out: dict[str, Any] = {}
    with sessionfs_mount(sessions, mnt, work / "mount-contention.log"):
        targets = {
            "mount": str(mnt),
            "store_api": str(sessions / "sessions.d"),
            "monolithic": str(sessions / "sessions.json"),
        }
        for name, target in targets.items():
            kind = "native" if name == "store_api" else name
            per_writer = run_writers(kind, target, list(range(8)), plan.contention_seconds)
            total = sum(len(w) for w in per_writer)
            out[name] = {
                "writers": 8,
                "seconds": plan.contention_seconds,
                "updates_per_s": total / plan.contention_seconds,
                "p99_ms": pct([x for w in per_writer for x in w], 99) * 1e3,
            }
            print(f"  8 writers via {name}: {out[name]['updates_per_s']:.0f} updates/s", flush=True)
        for name, kind, target in (
            ("", "mount", str(mnt)),
            ("store_api_", "native", str(sessions / "sessions.d")),
        ):
            alone = run_writers(kind, target, [100], plan.contention_seconds)[0]
            a_and_b = run_writers(kind, target, [100, 200], plan.contention_seconds)
            out[f"{name}a_alone"] = summary(alone)
            out[f"{name}a_while_b"] = summary(a_and_b[0])
            out[f"{name}b_updates_per_s"] = len(a_and_b[1]) / plan.contention_seconds
        print(
            f"  writer A's p99 while B hammers / alone: mount "
            f"{out['a_while_b']['p99_ms'] / out['a_alone']['p99_ms']:.2f}x, store API "
            f"{out['store_api_a_while_b']['p99_ms'] / out['store_api_a_alone']['p99_ms']:.2f}x",
            flush=True,
        )
    figures["contention"] = out


def bench_reads(plan: Plan, work: Path, figures: dict[str, Any]) -> None:
    """3. cached open/read/close, stat and listing: mount vs plain files vs null FUSE."""
    size = 10_000
    sessions = work / f"store-{size}" / "sessions"
    backing = sessions / "sessions.d"
    index = 4321
    plain_path = str(backing / key_to_filename(KEY.format(index)))
    entry_size = os.path.getsize(plain_path)
    out: dict[str, Any] = {}

    def measure(label: str, path: str, directory: str) -> None:
        read_via_path(path)
        out[label] = {
            "open_read_close": summary(sample(lambda: read_via_path(path), plan.read_samples)),
            "stat": summary(sample(lambda: os.stat(path), plan.read_samples * 2)),
            "listdir_10k": summary(sample(lambda: os.listdir(directory), 5, warmup=1)),
        }

    measure("plain", plain_path, str(backing))
    with sessionfs_mount(sessions, work / "mnt-read", work / "mount-read.log") as proc:
        mnt = work / "mnt-read"
        measure("mount", str(mnt / mount_name(index)), str(mnt))
        out["mount_stats"] = orjson.loads((mnt / ".sessionfs" / "stats").read_bytes())
        del proc
    with null_mount(work / "mnt-null", size, entry_size, work / "null.log"):
        mnt = work / "mnt-null"
        measure("null_fuse", str(mnt / mount_name(index)), str(mnt))
    with null_mount(work / "mnt-null-direct", size, entry_size, work / "null.log", "direct"):
        mnt = work / "mnt-null-direct"
        measure("null_fuse_direct", str(mnt / mount_name(index)), str(mnt))
    for label in ("plain", "mount", "null_fuse", "null_fuse_direct"):
        print(
            f"  {label:>16}: open/read/close "
            f"{out[label]['open_read_close']['p50_ms'] * 1e3:.0f} us, "
            f"stat {out[label]['stat']['p50_ms'] * 1e3:.1f} us, "
            f"listing 10k {out[label]['listdir_10k']['p50_ms']:.0f} ms",
            flush=True,
        )
    figures["read"] = out


_libc = ctypes.CDLL(None, use_errno=True)


def write_files_once(directory: Path, payloads: list[tuple[str, bytes]]) -> None:
    """The baseline for migration: create each file once, then one syncfs."""
    directory.mkdir()
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, data in payloads:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
            os.write(fd, data)
            os.close(fd)
        _libc.syncfs(dir_fd)
    finally:
        os.close(dir_fd)


def bench_migration(plan: Plan, work: Path, figures: dict[str, Any]) -> None:
    """4. migrating a legacy store against writing the same files once."""
    count = plan.migration_entries
    runs: dict[str, list[float]] = {"migration": [], "write_files_once": []}
    legacy = write_legacy_store(work / "legacy-template", "bench", count, transcripts=False)
    payloads = [(f"{i}.json", dumps(value)) for i, value in enumerate(legacy.values())]
    template = (work / "legacy-template" / "sessions.json").read_bytes()
    for attempt in range(2 if plan.quick else 3):
        target = work / f"baseline-{attempt}"
        os.sync()  # each run starts with nothing else waiting to be written
        start = time.perf_counter()
        write_files_once(target, payloads)
        runs["write_files_once"].append(time.perf_counter() - start)
        sessions = work / f"legacy-{attempt}" / "sessions"
        sessions.mkdir(parents=True)
        (sessions / "sessions.json").write_bytes(template)
        os.sync()
        start = time.perf_counter()
        report = migrate_store(AgentStore(sessions), progress=None)
        runs["migration"].append(time.perf_counter() - start)
        assert report.migrated == len(payloads) - len(report.folded), report.lines()
    figures["migration"] = {
        "entries": count,
        "legacy_bytes": len(template),
        "migration_s": min(runs["migration"]),
        "write_files_once_s": min(runs["write_files_once"]),
        "runs": runs,
    }
    print(
        f"  migration of {count:,}: {figures['migration']['migration_s']:.2f} s, "
        "writing the files once "
        f"{figures['migration']['write_files_once_s']:.2f} s",
        flush=True,
    )


def bench_visibility(plan: Plan, work: Path, figures: dict[str, Any]) -> None:
    """5. how soon an outside change shows through the mount."""
    sessions = work / "store-1000" / "sessions"
    mnt = work / "mnt-visibility"
    samples = []
    with (
        sessionfs_mount(sessions, mnt, work / "mount-visibility.log"),
        SessionStore(sessions / "sessions.d") as store,
    ):
        path = str(mnt / mount_name(7))
        read_via_path(path)
        for version in range(1, plan.visibility_samples + 1):
            data = entry_bytes(7, 10**6 + version)
            store.write(KEY.format(7), data)
            begin = time.perf_counter()
            while read_via_path(path) != data:
                if time.perf_counter() - begin > 5:
                    raise RuntimeError("an outside change did not show within 5 s")
            samples.append(time.perf_counter() - begin)
    figures["visibility"] = summary(samples)
    print(
        f"  visibility of outside changes: p50 {figures['visibility']['p50_ms']:.2f} ms, "
        f"p99 {figures['visibility']['p99_ms']:.2f} ms",
        flush=True,
    )


def proc_status_kb(pid: int, field: str) -> int:
    """A memory figure of process *pid* from /proc (VmRSS: now, VmHWM: its peak), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field)))


def bench_memory(plan: Plan, work: Path, figures: dict[str, Any]) -> None:
    """6. the daemon's resident memory with every session of a large store known."""
    count = plan.rss_entries
    sessions = work / f"store-{count}" / "sessions"
    mnt = work / "mnt-rss"
    with sessionfs_mount(sessions, mnt, work / "mount-rss.log") as proc:
        start = time.perf_counter()
        listed = len(os.listdir(mnt))
        listing_s = time.perf_counter() - start
        for i in range(0, count, max(1, count // 1000)):
            os.stat(mnt / mount_name(i))
        rss_kb = proc_status_kb(proc.pid, "VmRSS")
    figures["memory"] = {
        "sessions": count,
        "listed": listed,
        "rss_mb": rss_kb / 1024,
        "listing_s": listing_s,
    }
    print(f"  daemon RSS with {count:,} sessions listed: {rss_kb / 1024:.0f} MB", flush=True)


def bench_sqlite(plan: Plan, work: Path, figures: dict[str, Any]) -> None:
    """7. a SQLite-era agent: listing, cached read, a gateway commit seen, a 100 MB transcript."""
    sys.path.insert(0, str(REPO))
    from tests.sqlite_state import build_sqlite_state, database_of, put_session

    count = 10_000
    state = work / "sqlite-state"
    build_sqlite_state(
        state,
        {"main": {KEY.format(i): orjson.loads(entry_bytes(i)) for i in range(count)}},
    )
    database = database_of(state, "main")
    big_session = orjson.loads(entry_bytes(7))["sessionId"]
    event = orjson.dumps({"type": "message", "text": "x" * 1000}).decode()
    db = sqlite3.connect(database)
    db.executemany(
        "INSERT INTO transcript_events (session_id, seq, event_json, created_at) "
        "VALUES (?, ?, ?, 1)",
        ((big_session, 100 + seq, event) for seq in range(100 * 1024 * 1024 // len(event))),
    )
    db.commit()
    mnt = work / "mnt-sqlite"
    out: dict[str, Any] = {}
    with mounted(
        [sys.executable, "-m", "sessionfs", "mount", "-f", str(state), str(mnt)],
        mnt,
        "fuse.sessionfs",
        work / "mount-sqlite.log",
    ) as proc:
        agent = mnt / "main"
        path = str(agent / mount_name(4321))
        read_via_path(path)
        out["open_read_close"] = summary(sample(lambda: read_via_path(path), plan.read_samples))
        out["listdir_10k"] = summary(sample(lambda: os.listdir(agent), 5, warmup=1))
        out["names_listed"] = len(os.listdir(agent))  # each session's .json and .jsonl
        samples = []
        for version in range(1, plan.visibility_samples + 1):
            entry = orjson.loads(entry_bytes(9, 10**6 + version))
            put_session(db, KEY.format(9), entry)
            db.commit()
            begin = time.perf_counter()
            target = agent / mount_name(9)
            while orjson.loads(target.read_bytes()) != entry:
                if time.perf_counter() - begin > 5:
                    raise RuntimeError("a gateway commit did not show within 5 s")
            samples.append(time.perf_counter() - begin)
        out["commit_visible"] = summary(samples)
        transcript = agent / (mount_name(7) + "l")
        begin = time.perf_counter()
        total = 0
        with open(transcript, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
        seconds = time.perf_counter() - begin
        peak_kb = proc_status_kb(proc.pid, "VmHWM")
        out["transcript"] = {
            "bytes": total,
            "mb_per_s": total / 1e6 / seconds,
            "daemon_peak_rss_mb": peak_kb / 1024,
        }
    db.close()
    # The fair baseline for the listing: a null filesystem listing as many names.
    null_mnt = work / "mnt-null-sqlite"
    with null_mount(null_mnt, out["names_listed"], 1000, work / "null-sqlite.log"):
        out["null_listdir_same_names"] = summary(sample(lambda: os.listdir(null_mnt), 5, warmup=1))
    print(
        f"  sqlite: listing {out['names_listed']:,} names {out['listdir_10k']['p50_ms']:.0f} ms, "
        f"null FUSE listing as many {out['null_listdir_same_names']['p50_ms']:.0f} ms",
        flush=True,
    )
    print(
        f"  sqlite: open/read/close {out['open_read_close']['p50_ms'] * 1e3:.0f} us, "
        f"listing 10k {out['listdir_10k']['p50_ms']:.0f} ms, commit visible p99 "
        f"{out['commit_visible']['p99_ms']:.1f} ms, 100 MB transcript "
        f"{out['transcript']['mb_per_s']:.0f} MB/s (daemon peak "
        f"{out['transcript']['daemon_peak_rss_mb']:.0f} MB)",
        flush=True,
    )
    figures["sqlite"] = out


# -- report ------------------------------------------------------------------


def targets(figures: dict[str, Any], plan: Plan) -> list[Target]:
    up = figures["update"]
    big = str(max(plan.sizes))
    read = figures["read"]
    cont = figures["contention"]
    rows = [
        (
            "update via mount / store API (p50, 10,000 sessions)",
            up["10000"]["mount"]["p50_ms"] / up["10000"]["store_api"]["p50_ms"],
            "x",
            "<= 1.5",
        ),
        (
            "the floor: update via null FUSE committing / store API (p50, 10,000 sessions)",
            up["10000"]["null_fuse"]["p50_ms"] / up["10000"]["store_api"]["p50_ms"],
            "x",
            "<= 1.5",
        ),
        (
            "monolithic update / mount update (p50, 10,000 sessions)",
            up["10000"]["monolithic"]["p50_ms"] / up["10000"]["mount"]["p50_ms"],
            "x",
            ">= 100",
        ),
        (
            f"mount update cost, {int(big):,} vs 1,000 sessions (p50)",
            up[big]["mount"]["p50_ms"] / up["1000"]["mount"]["p50_ms"],
            "x",
            "<= 1.3",
        ),
        (
            "p99 of writer A while B is hammered / A alone (mount)",
            cont["a_while_b"]["p99_ms"] / cont["a_alone"]["p99_ms"],
            "x",
            "<= 2",
        ),
        (
            "cached open/read/close: mount / null FUSE, keep_cache (p50)",
            read["mount"]["open_read_close"]["p50_ms"]
            / read["null_fuse"]["open_read_close"]["p50_ms"],
            "x",
            "<= 2",
        ),
        (
            "cached open/read/close: mount / null FUSE, direct_io (p50)",
            read["mount"]["open_read_close"]["p50_ms"]
            / read["null_fuse_direct"]["open_read_close"]["p50_ms"],
            "x",
            "<= 1.3",
        ),
        (
            "stat: mount / plain file (p50)",
            read["mount"]["stat"]["p50_ms"] / read["plain"]["stat"]["p50_ms"],
            "x",
            "<= 1.5",
        ),
        (
            "listing 10,000 entries: mount / null FUSE (p50)",
            read["mount"]["listdir_10k"]["p50_ms"] / read["null_fuse"]["listdir_10k"]["p50_ms"],
            "x",
            "<= 2",
        ),
        (
            f"migration / writing {figures['migration']['entries']:,} files once",
            figures["migration"]["migration_s"] / figures["migration"]["write_files_once_s"],
            "x",
            "<= 1.5",
        ),
        ("visibility of an outside change (p99)", figures["visibility"]["p99_ms"], "ms", "<= 100"),
        (
            "SQLite: listing 10,000 sessions (20,000 names) / null FUSE, as many names (p50)",
            figures["sqlite"]["listdir_10k"]["p50_ms"]
            / figures["sqlite"]["null_listdir_same_names"]["p50_ms"],
            "x",
            "<= 2",
        ),
        (
            "SQLite: cached open/read/close / null FUSE, direct_io (p50)",
            figures["sqlite"]["open_read_close"]["p50_ms"]
            / read["null_fuse_direct"]["open_read_close"]["p50_ms"],
            "x",
            "<= 2",
        ),
        (
            "SQLite: a gateway commit visible (p99)",
            figures["sqlite"]["commit_visible"]["p99_ms"],
            "ms",
            "<= 1000",
        ),
        (
            "SQLite: reading a 100 MB transcript",
            figures["sqlite"]["transcript"]["mb_per_s"],
            "MB/s",
            ">= 50",
        ),
        (
            "SQLite: daemon peak RSS reading it",
            figures["sqlite"]["transcript"]["daemon_peak_rss_mb"],
            "MB",
            "<= 150",
        ),
        (
            f"daemon RSS with {figures['memory']['sessions']:,} sessions",
            figures["memory"]["rss_mb"],
            "MB",
            "<= 150",
        ),
    ]
    out = []
    for name, value, unit, target in rows:
        op, limit = target.split()
        met = value <= float(limit) if op == "<=" else value >= float(limit)
        out.append(Target(name, round(value, 3), unit, target, met))
    return out


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    fuse = subprocess.run(
        ["pkg-config", "--modversion", "fuse3"], capture_output=True, text=True, check=False
    )
    import pyfuse3

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3.__version__,
        "libfuse": fuse.stdout.strip(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def chart(figures: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no chart: pip install -e '.[bench]' for matplotlib)")
        return False
    sizes = sorted(int(s) for s in figures["update"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, key in (
        ("sessionfs mount", "mount"),
        ("store API (no FUSE)", "store_api"),
        ("null FUSE committing via the store API", "null_fuse"),
        ("monolithic sessions.json", "monolithic"),
    ):
        shown = [s for s in sizes if key in figures["update"][str(s)]]
        ax.plot(
            shown,
            [figures["update"][str(s)][key]["p50_ms"] for s in shown],
            marker="o",
            label=label,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sessions in the store")
    ax.set_ylabel("update latency, p50 (ms)")
    ax.set_title("Updating one session")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples; about a minute")
    parser.add_argument("--json", type=Path, default=REPO / "bench-results" / "latest.json")
    parser.add_argument("--chart", type=Path, default=REPO / "bench-results" / "update-latency.png")
    parser.add_argument("--workdir", type=Path, help="where to build stores (default: a temp dir)")
    args = parser.parse_args()
    plan = Plan.make(args.quick)
    work = Path(tempfile.mkdtemp(prefix="sessionfs-bench-", dir=args.workdir))
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        print(f"sessionfs benchmarks ({'quick' if plan.quick else 'full'}) in {work}", flush=True)
        for step in (
            bench_updates,
            bench_reads,
            bench_contention,
            bench_migration,
            bench_visibility,
            bench_memory,
            bench_sqlite,
        ):
            print(f"{step.__doc__.splitlines()[0] if step.__doc__ else step.__name__}", flush=True)
            step(plan, work, figures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = targets(figures, plan)
    width = max(len(t.name) for t in results)
    print(f"\n{'target':<{width}}  {'value':>10}  {'goal':>8}  met")
    for t in results:
        print(
            f"{t.name:<{width}}  {t.value:>8.2f} {t.unit:<2}  {t.target:>8}  "
            f"{'yes' if t.met else 'NO'}"
        )
    report = {
        "quick": plan.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "command": "scripts/bench" + (" --quick" if plan.quick else ""),
        "plan": asdict(plan),
        "figures": figures,
        "targets": [asdict(t) for t in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(
        orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    )
    drew = chart(figures, args.chart)
    print(f"\nraw figures: {args.json}" + (f"; chart: {args.chart}" if drew else ""))
    print(f"took {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
