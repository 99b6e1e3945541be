"""The files of a live cut (node/cow.py): the copy-on-write log and the tracking bitmap."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

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


def _boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, boot: str) -> None:
    """Pretend the kernel was booted as `boot` (a new boot loses the page cache)."""
    f = tmp_path / f"boot-{boot}"
    f.write_text(boot + "\n")
    monkeypatch.setattr(cow, "BOOT_ID", str(f))


@pytest.mark.parametrize("synced", [False, True], ids=["marks-not-flushed", "marks-flushed"])
def test_a_power_cut_never_leaves_a_written_chunk_out_of_the_bitmap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synced: bool) -> None:
    """The data of a marked chunk may reach the disk before its bit does: after a new boot, a
    bitmap written since its last sync is not trusted, and counts every chunk as changed."""
    path = str(tmp_path / "tracking" / "p.3.bitmap")
    size = 10 * cow.CHUNK
    _boot(monkeypatch, tmp_path, "one")
    b = cow.Bitmap(path, size=size)
    b.mark(0, 10)
    b.sync()
    b.mark(4 * cow.CHUNK, 10)   # its write may be on disk, its bit only in the page cache...
    if synced:
        b.sync()
    b.close()
    if not synced:              # ...which the power cut takes
        with open(path, "r+b") as f:
            f.write(b"\x01")
    _boot(monkeypatch, tmp_path, "two")
    again = cow.Bitmap(path, size=size)
    if synced:
        assert not again.untrusted
        assert list(cow.regions(again.bits(), size=size)) == [(0, cow.CHUNK), (4 * cow.CHUNK, cow.CHUNK)]
    else:
        assert again.untrusted
        assert list(cow.regions(again.bits(), size=size)) == [(0, size)]
    again.close()
    assert not cow.Bitmap(path, size=size).untrusted, "once opened, what it says is down: trusted again"


def test_a_killed_process_keeps_its_unflushed_marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same boot: the page cache the marks were written to survived the process."""
    path = str(tmp_path / "tracking" / "p.4.bitmap")
    _boot(monkeypatch, tmp_path, "one")
    b = cow.Bitmap(path, size=8 * cow.CHUNK)
    b.mark(3 * cow.CHUNK, 1)
    b.close()   # no sync
    again = cow.Bitmap(path, size=8 * cow.CHUNK)
    assert not again.untrusted
    assert list(cow.regions(again.bits(), size=8 * cow.CHUNK)) == [(3 * cow.CHUNK, cow.CHUNK)]


def test_a_bitmap_whose_marker_is_gone_is_not_trusted(tmp_path: Path) -> None:
    path = str(tmp_path / "tracking" / "p.5.bitmap")
    b = cow.Bitmap(path, size=8 * cow.CHUNK)
    b.mark(0, 1)
    b.sync()
    b.close()
    os.unlink(path + ".dirty")
    again = cow.Bitmap(path, size=8 * cow.CHUNK)
    assert again.untrusted and list(cow.regions(again.bits(), size=8 * cow.CHUNK)) == [(0, 8 * cow.CHUNK)]
    again.remove()
    assert os.listdir(tmp_path / "tracking") == []


def test_a_bitmap_dropped_under_a_write_never_fails_that_write(tmp_path: Path) -> None:
    """The daemon drops a bitmap (untrack) while writes it was carrying still mark it: they
    must find it closed, not a closed (or reused) descriptor, which the application would
    see as EIO."""
    failures: list[BaseException] = []
    for round_ in range(10):
        b = cow.Bitmap(str(tmp_path / "tracking" / f"p.{round_}.bitmap"), size=1 << 30)
        stop = threading.Event()

        def writes(b: cow.Bitmap = b, stop: threading.Event = stop) -> None:
            k = 0
            try:
                while not stop.is_set():
                    b.mark(k * cow.CHUNK, 1)   # a new chunk after each flush: the marker is synced first
                    b.sync()
                    k += 1
            except BaseException as e:  # noqa: BLE001 - what the test is about
                failures.append(e)
        t = threading.Thread(target=writes)
        t.start()
        time.sleep(0.02)
        b.remove()
        time.sleep(0.01)
        stop.set()
        t.join()
    assert failures == []
