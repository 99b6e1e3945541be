"""The host copy engine on real files and real loop devices."""
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.copy import engine
from csi_virtvol.copy.engine import CopyOptions, TokenBucket

MiB = 1 << 20
RW = CopyOptions(zero_copy=False)            # overlapped read/write, O_DIRECT
ZC = CopyOptions(zero_copy=True)             # copy_file_range
BOTH = pytest.mark.parametrize("opts", [RW, ZC], ids=["rw", "zero-copy"])


def write_sparse(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def data_map(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(o, n) for o, n, d in engine.data_segments(fd, 0, os.fstat(fd).st_size) if d]
    finally:
        os.close(fd)


def data_in(path: Path, off: int, n: int) -> bool:
    return any(o < off + n and off < o + m for o, m in data_map(path))


def rand(n: int) -> bytes:
    return os.urandom(n)


@pytest.fixture
def sparse_src(tmp_path: Path) -> Path:
    """40 MiB: data, a 6 MiB hole, data, 8 MiB of written zeros, data, hole to the end."""
    p = tmp_path / "src"
    write_sparse(p, 40 * MiB, {
        0: rand(MiB + 5),
        7 * MiB: rand(2 * MiB),
        9 * MiB: bytes(8 * MiB),
        17 * MiB: rand(3 * MiB + 123),
    })
    return p


@BOTH
def test_data_and_holes_preserved(sparse_src: Path, tmp_path: Path, opts: CopyOptions) -> None:
    dst = tmp_path / "dst"
    res = engine.copy_range(src=str(sparse_src), dst=str(dst), options=opts)
    assert dst.read_bytes() == sparse_src.read_bytes()
    assert res.length == 40 * MiB and res.zero_copy is (opts is ZC)
    # the source's holes stay holes in the target
    assert not data_in(dst, 2 * MiB, 5 * MiB)     # inside the 6 MiB hole
    assert not data_in(dst, 21 * MiB, 19 * MiB)   # the tail hole
    if opts is RW:  # a chunk of written zeros is detected and not written either
        assert not data_in(dst, 12 * MiB, 4 * MiB)
        assert res.bytes_written < 16 * MiB
    assert os.stat(dst).st_blocks * 512 <= os.stat(sparse_src).st_blocks * 512 + MiB


@BOTH
def test_target_data_over_source_holes_is_punched(sparse_src: Path, tmp_path: Path,
                                                  opts: CopyOptions) -> None:
    dst = tmp_path / "dst"
    write_sparse(dst, 40 * MiB, {0: rand(40 * MiB)})
    engine.copy_range(src=str(sparse_src), dst=str(dst), options=opts)
    assert dst.read_bytes() == sparse_src.read_bytes()
    assert not data_in(dst, 2 * MiB, 5 * MiB)
    assert not data_in(dst, 21 * MiB, 19 * MiB)


@BOTH
def test_offsets_and_length_honoured(tmp_path: Path, opts: CopyOptions) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    s = rand(11 * MiB)
    src.write_bytes(s)
    before = rand(16 * MiB)
    dst.write_bytes(before)
    so, do, n = 12345, 3 * 4096 + 7, 6 * MiB + 999
    res = engine.copy_range(src=str(src), dst=str(dst), src_offset=so, dst_offset=do, length=n,
                            options=opts)
    after = dst.read_bytes()
    assert res.length == n
    assert after[do:do + n] == s[so:so + n]
    assert after[:do] == before[:do] and after[do + n:] == before[do + n:]
    assert len(after) == len(before)


def test_aligned_offsets_use_o_direct_and_extend_the_target(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    s = rand(9 * MiB)
    src.write_bytes(s)
    res = engine.copy_range(src=str(src), dst=str(dst), src_offset=MiB, dst_offset=2 * MiB,
                            options=RW)
    assert res.direct_read and res.direct_write
    d = dst.read_bytes()
    assert len(d) == 10 * MiB and d[2 * MiB:] == s[MiB:] and not data_in(dst, 0, 2 * MiB)


def test_source_too_short_is_out_of_range(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(rand(MiB))
    with pytest.raises(errors.OutOfRange):
        engine.copy_range(src=str(src), dst=str(tmp_path / "dst"), src_offset=4096, length=MiB)
    with pytest.raises(errors.NotFound):
        engine.copy_range(src=str(tmp_path / "missing"), dst=str(tmp_path / "dst"))


@BOTH
def test_checkpoints_are_monotonic_and_end_at_length(tmp_path: Path, opts: CopyOptions) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(rand(20 * MiB))
    seen: list[int] = []
    o = CopyOptions(zero_copy=opts.zero_copy, checkpoint_bytes=4 * MiB, checkpoint_seconds=1e9)
    engine.copy_range(src=str(src), dst=str(dst), options=o, on_progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 20 * MiB
    assert len(seen) == 5  # every 4 MiB: 4, 8, 12, 16, 20
    assert all(b - a >= 4 * MiB for a, b in zip(seen, seen[1:]))


@BOTH
def test_cancel_then_resume(tmp_path: Path, opts: CopyOptions) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(rand(24 * MiB))
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int) -> None:
        seen.append(done)
        cancel.set()  # stop after the first checkpoint

    o = CopyOptions(zero_copy=opts.zero_copy, checkpoint_bytes=4 * MiB, checkpoint_seconds=1e9)
    with pytest.raises(engine.CopyCancelled) as ei:
        engine.copy_range(src=str(src), dst=str(dst), options=o, on_progress=progress,
                          cancel=cancel)
    done = ei.value.bytes_done
    assert 4 * MiB <= done < 24 * MiB and seen[-1] == done
    assert dst.read_bytes()[:done] == src.read_bytes()[:done]
    res = engine.copy_range(src=str(src), dst=str(dst), resume_from=done, options=o)
    assert res.resumed_from == done and res.bytes_written == 24 * MiB - done
    assert dst.read_bytes() == src.read_bytes()


@BOTH
def test_verify_detects_a_corrupted_target(tmp_path: Path, opts: CopyOptions) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(rand(12 * MiB))

    def corrupt(done: int) -> None:
        if done == 12 * MiB:  # the final checkpoint runs before verification
            with open(dst, "r+b") as f:
                f.seek(9 * MiB + 17)
                f.write(b"\xff\x00garbage")
                f.flush()
                os.fsync(f.fileno())

    o = CopyOptions(zero_copy=opts.zero_copy, verify=True)
    with pytest.raises(engine.VerifyMismatch) as ei:
        engine.copy_range(src=str(src), dst=str(dst), options=o, on_progress=corrupt)
    assert ei.value.offset == 8 * MiB  # the 4 MiB chunk holding the damage
    res = engine.copy_range(src=str(src), dst=str(dst), options=o)  # an intact copy verifies
    assert res.verified


# --- bandwidth limit ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, s: float) -> None:
        with self.lock:
            self.slept.append(s)
            self.now += s


def test_token_bucket_computes_sleeps() -> None:
    clk = FakeClock()
    b = TokenBucket(rate=100, burst=100, clock=clk)
    assert b.take(100) == 0.0          # the burst is free
    assert b.take(50) == pytest.approx(0.5)   # 50 bytes of debt at 100 B/s
    clk.now = 0.5
    assert b.take(100) == pytest.approx(1.0)  # debt paid; 100 more -> 1 s
    clk.now = 10.0                      # idle: refills only up to the burst
    assert b.take(100) == 0.0
    assert b.take(1) == pytest.approx(0.01)
    with pytest.raises(errors.InvalidRequest):
        TokenBucket(rate=0)


@BOTH
def test_copy_paces_to_the_limit(tmp_path: Path, opts: CopyOptions) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(rand(32 * MiB))
    clk = FakeClock()
    o = CopyOptions(zero_copy=opts.zero_copy, bwlimit=8 * MiB)
    engine.copy_range(src=str(src), dst=str(dst), options=o, clock=clk, sleep=clk.sleep)
    # 32 MiB at 8 MiB/s with an 8 MiB burst: 24 MiB of waiting = 3 s of fake time
    assert sum(clk.slept) == pytest.approx(3.0, rel=0.01)
    assert dst.read_bytes() == src.read_bytes()


# --- O_DIRECT fallback, block devices (root) ----------------------------------------------


@contextlib.contextmanager
def loop_device(image: Path, *, sector: int | None = None) -> Iterator[str]:
    argv = ["losetup", "--find", "--show"] + (["--sector-size", str(sector)] if sector else [])
    dev = subprocess.run(argv + [str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def ramfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.root
def test_o_direct_refused_at_open_falls_back(tmp_path: Path) -> None:
    """ramfs has no direct I/O: open(O_DIRECT) fails with EINVAL."""
    src = tmp_path / "src"
    src.write_bytes(rand(9 * MiB))
    with ramfs(tmp_path / "ram") as ram:
        dst = ram / "dst"
        with pytest.raises(OSError):
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_DIRECT))
        res = engine.copy_range(src=str(src), dst=str(dst), options=RW)
        assert res.direct_read and not res.direct_write
        assert dst.read_bytes() == src.read_bytes()


@pytest.mark.root
def test_o_direct_einval_on_io_falls_back(tmp_path: Path) -> None:
    """A 4096-byte-sector loop device refuses 512-aligned direct reads."""
    img = tmp_path / "img"
    data = rand(8 * MiB)
    img.write_bytes(data)
    with loop_device(img, sector=4096) as dev:
        dst = tmp_path / "dst"
        o = CopyOptions(zero_copy=False, align=512)
        res = engine.copy_range(src=dev, dst=str(dst), src_offset=512, options=o)
        assert not res.direct_read
        assert dst.read_bytes() == data[512:]


@pytest.mark.root
@pytest.mark.parametrize("target_zeroed", [False, True])
def test_block_device_target_zeroes_holes(sparse_src: Path, tmp_path: Path,
                                          target_zeroed: bool) -> None:
    img = tmp_path / "img"
    if target_zeroed:
        write_sparse(img, 48 * MiB, {})
    else:
        write_sparse(img, 48 * MiB, {0: rand(48 * MiB)})
    before = img.read_bytes()
    with loop_device(img) as dev:
        o = CopyOptions(target_zeroed=target_zeroed)
        res = engine.copy_range(src=str(sparse_src), dst=dev, dst_offset=4 * MiB, options=o)
        assert res.direct_write and not res.zero_copy
        with open(dev, "rb") as f:
            got = f.read()
    assert got[4 * MiB:44 * MiB] == sparse_src.read_bytes()
    assert got[:4 * MiB] == before[:4 * MiB] and got[44 * MiB:] == before[44 * MiB:]
    if target_zeroed:
        assert res.bytes_zeroed == 0 and res.bytes_skipped > 0
    else:
        assert res.bytes_zeroed >= 6 * MiB + 19 * MiB


@pytest.mark.root
def test_block_device_source_and_too_small_target(tmp_path: Path) -> None:
    img = tmp_path / "img"
    data = rand(8 * MiB)
    img.write_bytes(data)
    with loop_device(img) as dev:
        dst = tmp_path / "dst"
        res = engine.copy_range(src=dev, dst=str(dst), options=CopyOptions(verify=True))
        assert res.direct_read and res.verified and dst.read_bytes() == data
        assert engine.path_size(dev) == 8 * MiB
        with pytest.raises(errors.OutOfRange):
            engine.copy_range(src=str(dst), dst=dev, dst_offset=4096)
