"""The catalog: which store each directory shows, and how long an opened store lives."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessionfs.catalog import Catalog
from sessionfs.migrate import migrate_source
from sessionfs.sources import resolve
from sessionfs.store import SessionStore
from tests.helpers import entry_bytes

KEY = "agent:main:main"


@pytest.fixture
def migrated(state_dir: Path) -> Path:
    migrate_source(resolve(state_dir), progress=None)
    return state_dir


def test_a_replaced_store_is_closed_only_when_its_last_user_leaves(migrated: Path) -> None:
    catalog = Catalog(resolve(migrated))
    entries = migrated / "agents/main/sessions/sessions.d"
    with catalog.backing("main") as old:
        assert isinstance(old, SessionStore)
        entries.rename(entries.with_name("sessions.d.old"))
        with SessionStore(entries, create=True) as fresh:
            fresh.write(KEY, entry_bytes("fresh"))
        with catalog.backing("main") as new:  # another thread, after the replacement
            assert new is not old
            assert new.read(KEY).data == entry_bytes("fresh")
            assert catalog.open_stores == 2
        # the first user is still working in the old directory: its descriptor stays
        assert old.dir_fd >= 0
        assert old.read(KEY).data != entry_bytes("fresh")
    assert old.dir_fd == -1
    assert catalog.open_stores == 1
    catalog.close()
    assert catalog.open_stores == 0


def test_close_at_unmount_waits_for_users(migrated: Path) -> None:
    catalog = Catalog(resolve(migrated))
    with catalog.backing("main") as store:
        catalog.close()
        assert isinstance(store, SessionStore)
        assert store.read(KEY).data  # a call in flight at unmount still completes
    assert store.dir_fd == -1
