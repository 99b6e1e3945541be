"""Resync (only_changed): after N small changes, about N pieces are written, and the
target ends identical to the source."""
from __future__ import annotations

import os
import random
from pathlib import Path

from csi_virtvol.copy.engine import RESYNC_GRAIN, CopyOptions, copy_range

MiB = 1 << 20


def _changed_copy(tmp_path: Path, changes: int) -> tuple[Path, Path, set[int]]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(32 * MiB))
    copy_range(src=str(src), dst=str(dst))
    rng = random.Random(changes)
    touched = set()
    fd = os.open(src, os.O_RDWR)
    try:
        for _ in range(changes):
            off = rng.randrange(0, 32 * MiB - 4096) // 4096 * 4096
            os.pwrite(fd, os.urandom(4096), off)
            touched.update({off // RESYNC_GRAIN, (off + 4095) // RESYNC_GRAIN})
    finally:
        os.close(fd)
    return src, dst, touched


def test_resync_writes_only_the_changed_pieces(tmp_path: Path) -> None:
    src, dst, touched = _changed_copy(tmp_path, 20)
    res = copy_range(src=str(src), dst=str(dst), options=CopyOptions(only_changed=True))
    assert res.bytes_written == len(touched) * RESYNC_GRAIN
    assert res.bytes_unchanged == 32 * MiB - res.bytes_written
    assert src.read_bytes() == dst.read_bytes()
    again = copy_range(src=str(src), dst=str(dst), options=CopyOptions(only_changed=True))
    assert again.bytes_written == 0


def test_resync_clears_what_became_a_hole(tmp_path: Path) -> None:
    src, dst, _ = _changed_copy(tmp_path, 0)
    fd = os.open(src, os.O_RDWR)
    try:
        os.truncate(src, 16 * MiB)   # the second half of the source is now
        os.ftruncate(fd, 32 * MiB)   # a hole: zeros
    finally:
        os.close(fd)
    res = copy_range(src=str(src), dst=str(dst), options=CopyOptions(only_changed=True))
    assert res.bytes_written == 0 and res.bytes_zeroed == 16 * MiB
    assert dst.read_bytes() == src.read_bytes()


def test_plain_copy_rewrites_everything(tmp_path: Path) -> None:
    src, dst, _ = _changed_copy(tmp_path, 20)
    res = copy_range(src=str(src), dst=str(dst), options=CopyOptions(zero_copy=False))
    assert res.bytes_written == 32 * MiB and res.bytes_unchanged == 0
