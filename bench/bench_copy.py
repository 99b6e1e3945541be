#!/usr/bin/env python3
"""Host copy throughput: csi_virtvol.copy.engine against dd, same files, same run.

    .venv/bin/python bench/bench_copy.py [--dir DIR] [--size-mib 1024] [--rounds 2]

1. A fully written file of random data (default 1 GiB) copied by
   - the engine's default (copy_file_range for file to file),
   - the engine's O_DIRECT read/write path (reader + writer threads),
   - `dd if=A of=B bs=4M iflag=direct oflag=direct`,
   alternating, `--rounds` times each, page cache dropped before each run
   (as root) and the final sync inside the timing.
2. A 10 GiB sparse file holding 1 GiB of data against a 1 GiB dense file.

Prints markdown tables; runs in about a minute on the dev machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csi_virtvol.copy import engine  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def drop_caches() -> None:
    os.sync()
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def fill_random(path: Path, size: int, *, offset: int = 0) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.seek(offset)
        left = size
        i = 0
        while left:
            n = min(left, len(block))
            # vary the block so no two are equal (dedup-proof) without paying urandom per byte
            f.write(i.to_bytes(8, "little") + block[8:n])
            left -= n
            i += 1
        f.flush()
        os.fsync(f.fileno())


def timed(fn: Callable[[], object], dst: Path) -> float:
    dst.unlink(missing_ok=True)
    drop_caches()
    t = time.perf_counter()
    fn()
    os.sync()
    return time.perf_counter() - t


def engine_copy(src: Path, dst: Path, opts: engine.CopyOptions) -> Callable[[], object]:
    return lambda: engine.copy_range(src=str(src), dst=str(dst), options=opts)


def dd_copy(src: Path, dst: Path) -> Callable[[], object]:
    return lambda: subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=4M", "iflag=direct",
                                   "oflag=direct", "status=none"], check=True)


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp", help="where the test files go (a real disk)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="csi-virtvol-bench-", dir=args.dir))
    try:
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                            text=True).stdout.strip()
        print(f"# host copy benchmark: {size // MiB} MiB, {args.rounds} rounds, {fs} at {work}, "
              f"kernel {os.uname().release}, {os.cpu_count()} CPUs, "
              f"caches {'dropped' if os.geteuid() == 0 else 'NOT dropped (not root)'}\n")
        a, b = work / "a", work / "b"
        fill_random(a, size)

        runs: dict[str, Callable[[], object]] = {
            "engine default (copy_file_range)": engine_copy(a, b, engine.CopyOptions()),
            "engine O_DIRECT read/write": engine_copy(a, b, engine.CopyOptions(zero_copy=False)),
            "dd bs=4M iflag=direct oflag=direct": dd_copy(a, b),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn, b))
                if not same(a, b):
                    raise SystemExit(f"{name}: copy differs")
        dd = statistics.median(times["dd bs=4M iflag=direct oflag=direct"])
        print("| dense copy | median s | MiB/s | vs dd |")
        print("|---|---:|---:|---:|")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med:.2f} | {size / MiB / med:.0f} | {dd / med:.2f}x |")

        # sparse: 10x the size, with `size` bytes of data in 8 runs spread over it
        s = work / "sparse"
        with open(s, "wb") as f:
            f.truncate(10 * size)
        piece = size // 8
        for i in range(8):
            fill_random(s, piece, offset=i * (10 * size // 8))
        sb = work / "sparse-copy"
        sparse_t = statistics.median(
            [timed(engine_copy(s, sb, engine.CopyOptions()), sb) for _ in range(args.rounds)])
        sparse_rw = statistics.median(
            [timed(engine_copy(s, sb, engine.CopyOptions(zero_copy=False)), sb)
             for _ in range(args.rounds)])
        if not same(s, sb):
            raise SystemExit("sparse copy differs")
        alloc = os.stat(sb).st_blocks * 512
        dense_t = statistics.median(times["engine default (copy_file_range)"])
        dense_rw = statistics.median(times["engine O_DIRECT read/write"])
        print()
        print("| sparse vs dense (engine) | logical | data | median s | vs dense |")
        print("|---|---:|---:|---:|---:|")
        print(f"| dense, default | {size // MiB} MiB | {size // MiB} MiB | {dense_t:.2f} | 1.00x |")
        print(f"| sparse, default | {10 * size // MiB} MiB | {size // MiB} MiB | {sparse_t:.2f} "
              f"| {sparse_t / dense_t:.2f}x |")
        print(f"| dense, O_DIRECT r/w | {size // MiB} MiB | {size // MiB} MiB | {dense_rw:.2f} "
              f"| 1.00x |")
        print(f"| sparse, O_DIRECT r/w | {10 * size // MiB} MiB | {size // MiB} MiB "
              f"| {sparse_rw:.2f} | {sparse_rw / dense_rw:.2f}x |")
        print(f"\nsparse copy allocates {alloc // MiB} MiB for {size // MiB} MiB of data "
              f"(holes kept).")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
