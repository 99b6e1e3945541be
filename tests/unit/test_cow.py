"""The files of a live cut (node/cow.py): the copy-on-write log and the tracking bitmap."""
from __future__ import annotations

import os
from pathlib import Path

from csi_virtvol.node import cow


def test_the_store_is_reloaded_from_its_log_and_a_torn_last_record_is_dropped(tmp_path: Path) -> None:
    s = cow.CowStore.create(str(tmp_path), cut_id="p.1", size=10 * cow.CHUNK, limit=8 * cow.RECORD, at=1.0)
    assert s.preserve(3, b"a" * cow.CHUNK) and s.preserve(7, b"b" * 100)
    s.close()
    log = tmp_path / "cuts" / "p.1" / "cow"
    with open(log, "ab") as f:   # a crash while appending a third record
        f.write(b"VVCOW001" + b"\0" * 100)
    again = cow.CowStore(str(tmp_path / "cuts" / "p.1"))
    assert again.preserved == 2 and again.read(3) == b"a" * cow.CHUNK
    assert again.read(7) == b"b" * 100 + bytes(cow.CHUNK - 100)
    assert again.read(4) is None
    assert os.path.getsize(log) == 2 * cow.RECORD
    assert again.meta.at == 1.0


def test_a_store_at_its_limit_is_marked_full_and_stays_full(tmp_path: Path) -> None:
    s = cow.CowStore.create(str(tmp_path), cut_id="p.2", size=10 * cow.CHUNK, limit=2 * cow.RECORD, at=0.0)
    assert s.preserve(0, b"x") and s.preserve(1, b"y")
    assert not s.preserve(2, b"z") and s.full
    s.close()
    assert cow.CowStore(str(tmp_path / "cuts" / "p.2")).full


def test_the_bitmap_survives_a_reopen_and_gives_merged_regions(tmp_path: Path) -> None:
    path = str(tmp_path / "tracking" / "p.1.bitmap")
    size = 20 * cow.CHUNK + 512
    b = cow.Bitmap(path, size=size)
    b.mark(cow.CHUNK - 1, 2)            # chunks 0 and 1
    b.mark(5 * cow.CHUNK, 3 * cow.CHUNK)  # 5, 6, 7
    b.mark(20 * cow.CHUNK, 10)          # the short last chunk
    b.sync()
    b.close()
    bits = cow.Bitmap(path, size=size).bits()
    assert list(cow.regions(bits, size=size)) == [(0, 2 * cow.CHUNK), (5 * cow.CHUNK, 3 * cow.CHUNK),
                                                  (20 * cow.CHUNK, 512)]
