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


def test_a_manifest_lets_resync_skip_reading_the_target(tmp_path: Path) -> None:
    src, dst, touched = _changed_copy(tmp_path, 0)
    sums = str(tmp_path / "dst.sums")
    first = copy_range(src=str(src), dst=str(dst), options=CopyOptions(only_changed=True, checksums=sums))
    assert first.bytes_written == 0 and os.path.exists(sums)  # compare mode built the manifest
    fd = os.open(src, os.O_RDWR)
    try:
        for off in (0, 5 * MiB, 31 * MiB):
            os.pwrite(fd, os.urandom(4096), off)
    finally:
        os.close(fd)
    # damage the target behind the manifest's back: a trusted manifest means the target is not read
    with open(dst, "r+b") as f:
        f.seek(10 * MiB)
        f.write(b"x" * 4096)
    res = copy_range(src=str(src), dst=str(dst), options=CopyOptions(only_changed=True, checksums=sums))
    assert res.bytes_written == 3 * 4096
    assert src.read_bytes()[:10 * MiB] == dst.read_bytes()[:10 * MiB]
    assert dst.read_bytes()[10 * MiB:10 * MiB + 4096] == b"x" * 4096  # not read, so not seen
    # without the manifest the comparison finds it
    os.unlink(sums)
    fix = copy_range(src=str(src), dst=str(dst), options=CopyOptions(only_changed=True))
    assert fix.bytes_written == 4096 and src.read_bytes() == dst.read_bytes()


def test_an_interrupted_resync_leaves_no_manifest(tmp_path: Path) -> None:
    import threading

    from csi_virtvol.copy.engine import CopyCancelled

    src, dst, _ = _changed_copy(tmp_path, 0)
    sums = str(tmp_path / "dst.sums")
    copy_range(src=str(src), dst=str(dst), options=CopyOptions(only_changed=True, checksums=sums))
    src.write_bytes(os.urandom(32 * MiB))
    stop = threading.Event()

    def progress(done: int) -> None:
        stop.set()

    try:
        copy_range(src=str(src), dst=str(dst), on_progress=progress, cancel=stop,
                   options=CopyOptions(only_changed=True, checksums=sums, checkpoint_bytes=4 * MiB))
    except CopyCancelled:
        pass
    assert not os.path.exists(sums)  # half-resynced: the old manifest would lie


def _bitmap(tmp_path: Path, chunks: set[int], *, size: int) -> Path:
    grain = 64 * 1024
    bits = bytearray((size // grain + 7) // 8)
    for k in chunks:
        bits[k // 8] |= 1 << (k % 8)
    path = tmp_path / "changed.bits"
    path.write_bytes(bytes(bits))
    return path


def test_a_changed_map_resync_verifies_only_the_changed_chunks(tmp_path: Path) -> None:
    """Issue 9: a resync after 5% changed must not re-read the whole volume to verify it;
    it compares the chunks the node's tracking marks (the rest was verified before)."""
    src, dst, _ = _changed_copy(tmp_path, 0)
    grain = 64 * 1024
    chunks = {3, 17, 200, 511}
    fd = os.open(src, os.O_RDWR)
    try:
        for k in chunks:
            os.pwrite(fd, os.urandom(grain), k * grain)
    finally:
        os.close(fd)
    bits = _bitmap(tmp_path, chunks, size=32 * MiB)
    res = copy_range(src=str(src), dst=str(dst), options=CopyOptions(
        only_changed=True, changed_map=str(bits), verify=True))
    assert res.verified and res.bytes_verified == len(chunks) * grain
    assert src.read_bytes() == dst.read_bytes()
    full = copy_range(src=str(src), dst=str(dst), options=CopyOptions(only_changed=True, verify=True))
    assert full.bytes_verified == 32 * MiB


def test_a_changed_map_verification_still_catches_a_bad_chunk(tmp_path: Path) -> None:
    import pytest

    from csi_virtvol.copy.engine import VerifyMismatch

    src, dst, _ = _changed_copy(tmp_path, 0)
    grain = 64 * 1024
    bits = _bitmap(tmp_path, {5}, size=32 * MiB)
    # the target lies about chunk 5 after the copy (a write behind the copy's back)
    import csi_virtvol.copy.engine as engine

    real = engine._Copy.verify

    def corrupt_then_verify(self: "engine._Copy") -> int:
        os.pwrite(self.dst.fd, b"\xff" * 4096, 5 * grain)
        return real(self)

    engine._Copy.verify = corrupt_then_verify  # type: ignore[method-assign]
    try:
        with pytest.raises(VerifyMismatch):
            copy_range(src=str(src), dst=str(dst), options=CopyOptions(
                only_changed=True, changed_map=str(bits), verify=True))
    finally:
        engine._Copy.verify = real  # type: ignore[method-assign]
