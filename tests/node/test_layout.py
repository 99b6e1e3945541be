"""Pure checks of the extent arithmetic (no root needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.node import dm, layout
from csi_virtvol.node.layout import BackingExtent as E


def test_is_extension_accepts_append_and_growth_of_last() -> None:
    old = [E(path="/a", offset=512, length=1024), E(path="/b", offset=0, length=512)]
    assert layout.is_extension(old, old)
    assert layout.is_extension(old, [*old, E(path="/c", offset=0, length=512)])
    assert layout.is_extension(old, [old[0], E(path="/b", offset=0, length=4096)])


@pytest.mark.parametrize("new", [
    [E(path="/a", offset=512, length=1024)],                                         # shorter
    [E(path="/a", offset=0, length=1024), E(path="/b", offset=0, length=512)],       # moved
    [E(path="/a", offset=512, length=2048), E(path="/b", offset=0, length=512)],     # grew a middle one
    [E(path="/a", offset=512, length=1024), E(path="/b", offset=0, length=256)],     # shrank the last
])
def test_is_extension_refuses_moving_bytes(new: list[E]) -> None:
    old = [E(path="/a", offset=512, length=1024), E(path="/b", offset=0, length=512)]
    assert not layout.is_extension(old, new)


def test_validate(tmp_path: Path) -> None:
    lun = tmp_path / "lun"
    lun.write_bytes(bytes(8192))
    layout.validate([E(path=str(lun), offset=4096, length=4096)])
    with pytest.raises(errors.InvalidRequest):
        layout.validate([])
    with pytest.raises(errors.InvalidRequest):
        layout.validate([E(path=str(lun), offset=100, length=4096)])
    with pytest.raises(errors.OutOfRange):
        layout.validate([E(path=str(lun), offset=4096, length=8192)])
    with pytest.raises(errors.NotFound):
        layout.validate([E(path=str(tmp_path / "nope"), offset=0, length=512)])


def test_table_round_trip(tmp_path: Path) -> None:
    t = layout.Table(extents=(E(path="/a", offset=512, length=1024),), readonly=True)
    t.save(str(tmp_path / "t.json"))
    assert layout.Table.load(str(tmp_path / "t.json")) == t
    assert t.size == 1024


def test_dm_plan_appends_segments_for_growth() -> None:
    ext = [E(path="/a", offset=512, length=1024), E(path="/b", offset=0, length=512)]
    segs = dm.plan(ext, [])
    assert [(s.path, s.offset, s.length) for s in segs] == [("/a", 512, 1024), ("/b", 0, 512)]
    grown = [ext[0], E(path="/b", offset=0, length=2048), E(path="/c", offset=1024, length=512)]
    segs2 = dm.plan(grown, segs)
    assert [(s.path, s.offset, s.length) for s in segs2] == [
        ("/a", 512, 1024), ("/b", 0, 512), ("/b", 512, 1536), ("/c", 1024, 512)]
    assert dm.plan(grown, segs2) == segs2
    with pytest.raises(errors.InvalidRequest):
        dm.plan([E(path="/a", offset=0, length=1024)], segs)
