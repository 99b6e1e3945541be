#!/usr/bin/env python3
"""Remote copy (array to array) against host copy of the same LUN, and a differential
resync by dirty bitmap against a full one, between two qsd arrays on this machine.

Two qemu-storage-daemons (the `qsd` driver starts them), each with its pool in its own
directory under --dir.  One LUN of --size-mib is filled with random data on array A;
then, in one run:

  nbdcopy        nbdcopy A-export -> B-export (libnbd's parallel copier: the baseline)
  remote full    A pushes the LUN into a LUN of B (blockdev-backup sync=full to NBD)
  host           the host copy engine, A's LUN -> B's LUN through their nbdfuse files
                 (what a copy pod does when no array can copy)
  remote resync  5% of the 64 KiB grains changed: A pushes only the dirty grains
                 (blockdev-backup sync=bitmap with the tracking started at the full copy)
  remote full'   the same change pushed whole again, for comparison

  .venv/bin/python bench/bench_remote.py [--size-mib 512] [--quick] [--dir /var/tmp]
"""
from __future__ import annotations

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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import arg_parser, describe_fs  # noqa: E402
from csi_virtvol.backends.qsd import BITMAP_GRANULARITY, QsdDriver  # noqa: E402
from csi_virtvol.copy.engine import copy_range  # noqa: E402
from csi_virtvol.model.array import ArraySpec  # noqa: E402
from csi_virtvol.model.ids import ArrayId, LunId  # noqa: E402

MiB = 1 << 20


def push(a: QsdDriver, *, source: LunId, target: str, job: str, since: str = "") -> tuple[float, int]:
    t0 = time.monotonic()
    a.start_remote_copy(source=source, target_address=target, job=job, since=since)
    while True:
        st = a.remote_copy_progress(job=job)
        if st.done:
            if st.error:
                raise SystemExit(f"remote copy {job} failed: {st.error}")
            return time.monotonic() - t0, st.bytes_total
        time.sleep(0.01)


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - t0


def main() -> int:
    ap = arg_parser(__doc__ or "", quick_help="128 MiB instead of --size-mib",
                    dir_help="parent of the two pools (default /var/tmp)")
    ap.add_argument("--size-mib", type=int, default=512)
    args = ap.parse_args()
    size = (128 if args.quick else args.size_mib) * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-remote-", dir=args.dir))
    drivers: list[QsdDriver] = []
    try:
        a, b = (QsdDriver(ArraySpec(id=ArrayId(n), kind="qsd",
                                    params={"pool": str(work / n), "start": "true"})) for n in ("a", "b"))
        drivers += [a, b]
        src = a.create_lun(name="src", size=size)
        with open(a.open_path(lun_id=src.id), "r+b") as f:
            for _ in range(size // (4 * MiB)):
                f.write(os.urandom(4 * MiB))
            f.flush()
            os.fsync(f.fileno())
        rows: list[tuple[str, float, int]] = []

        dst0 = b.create_lun(name="nbdcopy", size=size)
        rows.append(("nbdcopy (baseline)", timed(["nbdcopy", src.address, dst0.address]), size))

        dst1 = b.create_lun(name="remote", size=size)
        a.start_tracking(lun_id=src.id, name="bench")  # from the full copy on, as a pair does
        secs, moved = push(a, source=src.id, target=dst1.address, job="full")
        rows.append(("remote full", secs, moved))

        dst2 = b.create_lun(name="host", size=size)
        src_file, dst_file = a.open_path(lun_id=src.id), b.open_path(lun_id=dst2.id)
        t0 = time.monotonic()
        res = copy_range(src=src_file, dst=dst_file)
        rows.append(("host (copy engine over nbdfuse)", time.monotonic() - t0, res.bytes_written))

        grains = size // BITMAP_GRANULARITY
        changed = random.Random(1).sample(range(grains), max(1, grains // 20))
        with open(src_file, "r+b") as f:
            for g in changed:
                f.seek(g * BITMAP_GRANULARITY + 4096)
                f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
        secs, moved = push(a, source=src.id, target=dst1.address, job="resync", since="bench")
        rows.append((f"remote resync ({len(changed)} of {grains} grains changed)", secs, moved))
        secs, moved = push(a, source=src.id, target=dst0.address, job="full-again")
        rows.append(("remote full, same change", secs, moved))

        same = subprocess.run(["cmp", a.open_path(lun_id=src.id), b.open_path(lun_id=dst1.id)],
                              capture_output=True)
        base = rows[0][1]
        print(f"# bench_remote  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
              f"{os.cpu_count()} cpu  qemu-storage-daemon pools on {describe_fs(work)}")
        print(f"LUN {size // MiB} MiB; resynced copy identical to the source: {same.returncode == 0}")
        print(f"| copy | seconds | MiB moved | MiB/s | time vs nbdcopy |")
        print(f"|---|---:|---:|---:|---:|")
        for name, secs, moved in rows:
            print(f"| {name} | {secs:.2f} | {moved / MiB:.1f} | {moved / MiB / max(secs, 1e-9):.0f} "
                  f"| {secs / base:.2f}x |")
        return 0 if same.returncode == 0 else 1
    finally:
        for d in drivers:
            d.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
