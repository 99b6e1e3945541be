#!/usr/bin/env python3
"""Resync of a split copy after 5% of its pages changed, against a full copy.

Runs the host copy engine (what `csi-virtvol copy` and copy pods run) on
files on this machine's disk, in one run:

  full copy        copy_range of the whole range (copy_file_range, sparse-aware)
  dd               dd if=A of=B bs=4M iflag=direct oflag=direct (baseline)
  resync compare   --only-changed, no manifest: reads source and target
  resync manifest  --only-changed with the page manifest: reads the source only

for two change patterns: 5% of 4 KiB pages changed at random, and 5% of the
range changed in 1 MiB runs (a log or a database's hot region).

  .venv/bin/python bench/bench_resync.py [--size-gib 1] [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csi_virtvol.copy.engine import CopyOptions, copy_range  # noqa: E402

MiB = 1 << 20
PAGE = 4096


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def timed(fn: "object") -> float:
    drop_caches()
    t = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - t


def change(path: Path, size: int, pattern: str, seed: int) -> int:
    """Rewrite 5% of the file; return bytes changed."""
    rng = random.Random(seed)
    total = size // 20
    fd = os.open(path, os.O_RDWR)
    try:
        if pattern == "random 4 KiB pages":
            pages = rng.sample(range(size // PAGE), total // PAGE)
            for p in pages:
                os.pwrite(fd, os.urandom(PAGE), p * PAGE)
            total = len(pages) * PAGE
        else:
            runs = rng.sample(range(size // MiB), total // MiB)
            for r in runs:
                os.pwrite(fd, os.urandom(MiB), r * MiB)
            total = len(runs) * MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30)) // MiB * MiB
    work = Path(tempfile.mkdtemp(prefix="virtvol-resync-", dir=args.dir))
    src, dst, base = work / "src", work / "dst", work / "base"
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(work)], capture_output=True,
                        text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print("# csi-virtvol resync after 5% changed vs a full copy\n")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- machine: {os.cpu_count()} CPUs, {cpu}; kernel {platform.release()}")
    print(f"- files: {size // MiB} MiB of random data on {fs} ({work})")
    print()
    rows = []
    try:
        block = os.urandom(4 * MiB)
        with open(src, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block if random.random() < 0.5 else os.urandom(len(block)))
        t_full = timed(lambda: copy_range(src=str(src), dst=str(dst)))
        t_dd = timed(lambda: subprocess.run(
            ["dd", f"if={src}", f"of={work / 'dd'}", "bs=4M", "iflag=direct", "oflag=direct", "status=none"],
            check=True))
        os.unlink(work / "dd")
        rows.append(("full copy", "-", t_full, size, t_dd))
        for i, pattern in enumerate(("random 4 KiB pages", "1 MiB runs")):
            shutil.copyfile(dst, base)  # the target as the last sync left it
            changed = change(src, size, pattern, i)
            res: list[int] = []
            shutil.copyfile(base, dst)
            t_cmp = timed(lambda: res.append(copy_range(
                src=str(src), dst=str(dst), options=CopyOptions(only_changed=True)).bytes_written))
            rows.append(("resync compare", pattern, t_cmp, res[-1], t_dd))
            # manifest of the target as the last sync left it, then the same change again
            sums = str(work / "dst.sums")
            shutil.copyfile(base, dst)
            copy_range(src=str(base), dst=str(dst), options=CopyOptions(only_changed=True, checksums=sums))
            t_sum = timed(lambda: res.append(copy_range(
                src=str(src), dst=str(dst), options=CopyOptions(only_changed=True, checksums=sums)).bytes_written))
            rows.append(("resync manifest", pattern, t_sum, res[-1], t_dd))
            assert src.read_bytes() == dst.read_bytes(), "resync result differs from the source"
            os.unlink(sums)
            assert changed <= res[-1] <= changed + changed // 2
        print("| what | 5% changed as | seconds | bytes written | × full copy time | × dd time |")
        print("|---|---|---:|---:|---:|---:|")
        for what, pattern, t, written, dd in rows:
            print(f"| {what} | {pattern} | {t:.2f} | {written >> 20} MiB | {t / t_full:.2f} | {t / dd:.2f} |")
        print(f"\ndd bs=4M iflag=direct oflag=direct of the same file: {t_dd:.2f} s "
              f"({size / MiB / t_dd:.0f} MiB/s); full copy {size / MiB / t_full:.0f} MiB/s.")
        print("Caches dropped before every timed step.  'resync compare' reads source and target; "
              "'resync manifest' reads the source and the page manifest only.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
