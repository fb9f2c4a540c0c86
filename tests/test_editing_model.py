"""The editing layer against a model: after every step, mount, index and sessions.d/ agree.

Outside writes (the gateway), writes through the mount (accepted and refused), editor
saves, renames away and back, unlinks and re-creations, renames between keys and the
end of grace periods, interleaved at random.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pyfuse3
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sessionfs.fsck import OWN_DOT_NAMES
from sessionfs.keys import filename_to_key, key_to_display
from sessionfs.store import SessionStore, Version
from tests.driving import Clock, Driver, make_filesystem
from tests.helpers import entry_bytes

KEYS = ["cron:a", "cron:b", "agent:x:main"]
keys = st.sampled_from(KEYS)
versions = st.integers(min_value=0, max_value=5)
_T = TypeVar("_T")


def content(n: int) -> bytes:
    return entry_bytes(f"v{n}", updated_at=n, pad="p" * (n * 37))


class EditingModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp())
        (self.tmp / "sessions").mkdir()
        self.gateway = SessionStore(self.tmp / "sessions" / "sessions.d")
        self.clock = Clock()
        self.fs = make_filesystem(self.tmp / "sessions", clock=self.clock)
        self.fs.index.watch(None)
        self.patch = pytest.MonkeyPatch()
        self.drive = Driver(self.fs, self.patch)
        self.model: dict[str, bytes] = {}  # what sessions.d/ holds
        self.hidden: dict[str, bool] = {}  # renamed away -> changed behind the mount since
        self.removed: dict[str, bytes] = {}  # unlinked through the mount, within the grace

    def teardown(self) -> None:
        self.patch.undo()
        self.gateway.close()
        self.fs.operations.backings.catalog.close()
        shutil.rmtree(self.tmp)

    def run(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        return trio.run(fn)

    def visible(self) -> set[str]:
        return {key for key in self.model if key not in self.hidden}

    async def settle(self) -> None:
        root = self.fs.operations.tree.root
        await self.fs.index.refresh(root, KEYS)

    # -- the gateway, behind the mount --------------------------------------

    @rule(key=keys, n=versions)
    def outside_write(self, key: str, n: int) -> None:
        data = content(n)
        if key in self.hidden and self.model.get(key) != data:
            self.hidden[key] = True
        self.gateway.write(key, data)
        self.model[key] = data
        self.run(self.settle)

    @rule(key=keys)
    def outside_delete(self, key: str) -> None:
        if key not in self.model:
            return
        if key in self.hidden:
            self.hidden[key] = True
        self.gateway.delete(key)
        del self.model[key]
        self.run(self.settle)

    # -- tools through the mount --------------------------------------------

    @rule(key=keys, n=versions, valid=st.booleans())
    def write(self, key: str, n: int, valid: bool) -> None:
        data = content(n) if valid else b"{not an entry " + bytes([65 + n])
        name = key_to_display(key)

        async def write() -> bool:
            try:
                await self.drive.write(name, data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            except pyfuse3.FUSEError:
                return False
            return True

        accepted = self.run(write)
        assert accepted == valid
        if valid:
            self.model[key] = data
            self.hidden.pop(key, None)
            self.removed.pop(key, None)
        elif key in self.visible():
            pass  # refused: the entry stays as it was
        elif key in self.hidden:
            del self.hidden[key]  # the refused save brings the session back under its name
        elif key in self.removed:
            self.model[key] = self.removed.pop(key)  # delete-then-create refused: it comes back

    @precondition(lambda self: self.visible())
    @rule(data=st.data(), n=versions, valid=st.booleans())
    def editor_save(self, data: st.DataObject, n: int, valid: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.visible())))
        new = content(n) if valid else b"{broken"
        name = key_to_display(key)

        async def save() -> bool:
            try:
                await self.drive.editor_save(name, new)
            except pyfuse3.FUSEError:
                await self.drive.unlink(f"{name}~")
                return False
            return True

        assert self.run(save) == valid
        self.removed.pop(key, None)
        if valid:
            self.model[key] = new

    @precondition(lambda self: self.visible())
    @rule(data=st.data())
    def rename_away(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.visible())))
        self.run(lambda: self.drive.rename(key_to_display(key), f"{key_to_display(key)}.bak"))
        self.hidden[key] = False
        self.removed.pop(key, None)

    @precondition(lambda self: self.hidden)
    @rule(data=st.data())
    def rename_back(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.hidden)))
        name = key_to_display(key)

        async def back() -> None:
            await self.drive.rename(f"{name}.bak", name)

        self.run(back)
        self.model[key] = self.run(lambda: self.drive.read(name))
        del self.hidden[key]

    @precondition(lambda self: self.visible())
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.visible())))
        self.run(lambda: self.drive.unlink(key_to_display(key)))
        self.removed[key] = self.model.pop(key)

    @precondition(lambda self: self.visible())
    @rule(data=st.data(), new_key=keys)
    def rename(self, data: st.DataObject, new_key: str) -> None:
        key = data.draw(st.sampled_from(sorted(self.visible())))
        if key == new_key:
            return
        self.run(lambda: self.drive.rename(key_to_display(key), key_to_display(new_key)))
        self.model[new_key] = self.model.pop(key)
        self.hidden.pop(new_key, None)
        self.removed.pop(new_key, None)

    @rule()
    def grace_periods_end(self) -> None:
        self.clock.now += 5
        self.run(self.fs.graces.expire)
        for key, changed in self.hidden.items():
            if not changed:
                self.model.pop(key, None)
        self.hidden.clear()
        self.removed.clear()

    # -- what must hold after every step --------------------------------------

    @invariant()
    def store_matches_the_model(self) -> None:
        held = {}
        for name in os.listdir(self.gateway.path):
            if name in OWN_DOT_NAMES:  # the key locks, the kept versions
                continue
            key = filename_to_key(name)
            assert key is not None, f"stray {name!r} in sessions.d"
            held[key] = (self.gateway.path / name).read_bytes()
        assert held == self.model

    @invariant()
    def mount_shows_the_model(self) -> None:
        async def check() -> None:
            listed = {n for n in await self.drive.listdir() if n.endswith(".json")}
            assert listed == {key_to_display(k) for k in self.visible()}
            for key in KEYS:
                name = key_to_display(key)
                if key in self.visible():
                    assert (await self.drive.lookup(name)).st_size == len(self.model[key])
                    assert await self.drive.read(name) == self.model[key]
                else:
                    assert not await self.drive.exists(name)

        self.run(check)

    @invariant()
    def index_matches_the_disk(self) -> None:
        self.fs.index.check()
        root = self.fs.operations.tree.root
        for key in KEYS:
            seen = root.present(key)
            if key in self.model:
                assert seen is not None, key
                assert seen.version == Version.of(self.gateway.stat(key)), key
            else:
                assert seen is None, key


EditingModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("SESSIONFS_MODEL_EXAMPLES", "60")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_editing_model = EditingModel.TestCase
