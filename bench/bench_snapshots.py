#!/usr/bin/env python3
"""Snapshot latency of fully written volumes: native internal copy (XFS reflink) vs host copy (ext4).

    .venv/bin/python bench/bench_snapshots.py [--quick] [--sizes 1,4,16] [--dir /var/tmp]

What runs (all in one invocation, so ratios compare like with like):

* Two pool filesystems, each on a loop device (``--direct-io=on``, so neither the data
  nor the baselines are served from a second, host-side page cache) over a sparse image
  in ``--dir``: XFS made with ``-m reflink=1`` (the file pool probes INTERNAL_COPY there)
  and ext4 (no FICLONE, so a snapshot is a host copy).
* The plugin: ``csi-virtvol serve`` as a subprocess (mode all, sqlite store in ``--dir``),
  with two file pools, ``xfs`` and ``ext4``, talking gRPC over a unix socket.
* Per size (``--sizes`` GiB, one at a time) and per pool: CreateVolume
  (``layout=single``, ``arrays=<pool>``), then the LUN file is filled end to end with a
  repeating 4 MiB random buffer (O_DIRECT writes, fsync; the volume is unpublished, so
  nothing else has it open).  Then, each after ``sync`` and dropping the page cache:
  - ``dd``: ``dd if=LUN of=<same fs> bs=4M iflag=direct oflag=direct``; the copy is removed
    (ext4 only: the host copy's baseline; ``--xfs-dd`` adds it on XFS too);
  - ``cp --reflink=always`` of the same LUN file (XFS only); the copy is removed;
  - the snapshot: CreateSnapshot (``arrays=<pool>``) called back to back until it
    answers ``ready_to_use`` (the plugin holds each call up to 8 s and polls its copy
    every 0.2 s, so a snapshot that is ready within a call is seen within 0.2 s).
    Latency = first call sent to the ready answer.  The pair record in the plugin's
    state.db gives the per-extent copy methods and the copy's own start/end times.
  Three 4 MiB pieces (first, middle, last) of the snapshot are compared with the source,
  then the snapshot and the volume are deleted and the filesystem trimmed (the loop
  device punches the freed blocks out of the image), so disk use is bounded by the
  largest size: about 2 x size on the machine's disk at any time.
* Space: the images need about 2 x the largest size of real space on ``--dir``'s
  filesystem.  Without ``--sizes``, when that is short, 1,4,16 is scaled down to 1,4,8
  and the output says so.

Everything created (plugin, socket, state, mounts, loop devices, images) is removed on exit.
Prints machine facts and a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from _common import Plugin, arg_parser, describe_fs, machine_facts, mount_cap, sh  # noqa: E402
from csi_virtvol.csi._gen import csi_pb2 as pb  # noqa: E402
from csi_virtvol.store import base as S  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB
IMAGE = 40 * GiB
SNAPSHOT_TIMEOUT = 3600.0


# ---- helpers ---------------------------------------------------------------------------------

def cold() -> None:
    """Everything written is on disk and nothing is cached."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(*argv: str) -> float:
    cold()
    t = time.perf_counter()
    sh(*argv)
    return time.perf_counter() - t


@dataclass
class Fs:
    kind: str  # "xfs" | "ext4"
    mnt: Path
    dev: str
    direct_io: bool
    image_size: int

    @property
    def pool(self) -> Path:
        return self.mnt / "pool"

    def describe(self, work: Path) -> str:
        opts = "reflink=1, " if self.kind == "xfs" else "noinit_itable, "
        return (f"{self.kind} ({opts}loop {self.dev}, direct-io {'on' if self.direct_io else 'OFF'}) "
                f"over a sparse {self.image_size // GiB} GiB image on {describe_fs(work)}")


@contextlib.contextmanager
def loop_fs(kind: str, work: Path, size: int) -> Iterator[Fs]:
    image, mnt = work / f"{kind}.img", work / f"mnt-{kind}"
    mnt.mkdir()
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: image.unlink(missing_ok=True))
        with open(image, "wb") as f:
            f.truncate(size)
        direct = True
        p = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                           capture_output=True, text=True)
        if p.returncode != 0:  # the backing filesystem refuses direct I/O: buffered loop
            direct = False
            p = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"losetup {image}: {p.stderr.strip()}")
        dev = p.stdout.strip()
        stack.callback(lambda: subprocess.run(["losetup", "-d", dev], check=False))
        if kind == "xfs":
            sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev)
            sh("mount", "-t", "xfs", dev, str(mnt))
        else:
            # no lazy inode-table init thread writing in the background while we measure
            sh("mkfs.ext4", "-q", "-F", "-m", "0", dev)
            sh("mount", "-t", "ext4", "-o", "noinit_itable", dev, str(mnt))
        stack.callback(lambda: subprocess.run(["umount", str(mnt)], check=False))
        yield Fs(kind=kind, mnt=mnt, dev=dev, direct_io=direct, image_size=size)


# ---- one measurement -------------------------------------------------------------------------

@dataclass
class Row:
    pool: str
    size: int
    fill_s: float
    dd_s: float | None
    reflink_s: float | None
    snap_s: float
    calls: int
    pair_s: float
    methods: list[str]
    state: str


def fill(path: Path, size: int) -> float:
    """Write `size` bytes of a repeating 4 MiB random buffer over the whole file, durably."""
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(CHUNK))
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        off = 0
        while off < size:
            n = os.pwrite(fd, buf, off) if size - off >= CHUNK else os.pwrite(fd, buf[:size - off], off)
            if n <= 0:
                raise SystemExit(f"short write at {off} of {path}")
            off += n
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return time.perf_counter() - t


def same_pieces(a: Path, b: Path, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in (0, (size // 2) // CHUNK * CHUNK, size - CHUNK):
            fa.seek(off)
            fb.seek(off)
            if fa.read(CHUNK) != fb.read(CHUNK):
                return False
    return True


def lun_files(plugin: Plugin, fs: Fs, vid: str) -> list[Path]:
    with plugin.store() as st:
        rec = st.get(S.VOLUMES, vid)
        if rec is None:
            raise SystemExit(f"{vid}: no volume record")
        if any(e.array != fs.kind or e.offset != 0 for e in rec.value.extents):
            raise SystemExit(f"{vid}: unexpected extents {rec.value.extents}")
        return [fs.pool / "luns" / f"{e.lun}.img" for e in rec.value.extents]


def measure(plugin: Plugin, fs: Fs, size: int, *, xfs_dd: bool) -> Row:
    tag = uuid.uuid4().hex[:6]
    vid = sid = ""
    try:
        vol = plugin.controller.CreateVolume(pb.CreateVolumeRequest(
            name=f"snapbench-{tag}", capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_cap()], parameters={"arrays": fs.kind, "layout": "single"}),
            timeout=300).volume
        vid = vol.volume_id
        luns = lun_files(plugin, fs, vid)
        if len(luns) != 1 or luns[0].stat().st_size != size:
            raise SystemExit(f"{vid}: expected one LUN file of {size} bytes, got {luns}")
        lun = luns[0]
        fill_s = fill(lun, size)

        copy = fs.mnt / f"baseline-{tag}.img"
        dd_s = None
        if fs.kind == "ext4" or xfs_dd:
            dd_s = timed("dd", f"if={lun}", f"of={copy}", "bs=4M", "iflag=direct", "oflag=direct", "status=none")
            if copy.stat().st_size != size:
                raise SystemExit(f"dd copied {copy.stat().st_size} of {size} bytes")
            copy.unlink()
        reflink_s = None
        if fs.kind == "xfs":
            reflink_s = timed("cp", "--reflink=always", str(lun), str(copy))
            copy.unlink()

        cold()
        req = pb.CreateSnapshotRequest(name=f"snapbench-snap-{tag}", source_volume_id=vid,
                                       parameters={"arrays": fs.kind})
        calls = 0
        t0 = time.perf_counter()
        while True:
            calls += 1
            snap = plugin.controller.CreateSnapshot(req, timeout=120).snapshot
            sid = snap.snapshot_id
            if snap.ready_to_use:
                break
            if time.perf_counter() - t0 > SNAPSHOT_TIMEOUT:
                raise SystemExit(f"snapshot of {size // GiB} GiB on {fs.kind} not ready after {SNAPSHOT_TIMEOUT:.0f} s")
        snap_s = time.perf_counter() - t0

        with plugin.store() as st:
            rec = st.get(S.PAIRS, sid)
            if rec is None:
                raise SystemExit(f"{sid}: no pair record")
            t = rec.value.targets[0]
            methods = [e.method.value for e in t.extents]
            state = t.state.value
            pair_s = t.ended_at - t.started_at if t.ended_at else float("nan")
            if t.bytes_done != size or t.bytes_total != size:
                raise SystemExit(f"{sid}: pair copied {t.bytes_done} of {t.bytes_total} bytes, volume {size}")
        snap_luns = lun_files(plugin, fs, sid)
        if len(snap_luns) != 1 or not same_pieces(lun, snap_luns[0], size):
            raise SystemExit(f"{sid}: the snapshot's LUN does not match its source")
        return Row(pool=fs.kind, size=size, fill_s=fill_s, dd_s=dd_s, reflink_s=reflink_s, snap_s=snap_s,
                   calls=calls, pair_s=pair_s, methods=methods, state=state)
    finally:
        if sid:
            plugin.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid), timeout=300)
        if vid:
            plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=300)
        for f in fs.mnt.glob("baseline-*.img"):
            f.unlink()
        left = [f for f in os.listdir(fs.pool / "luns") if not f.startswith(".")] \
            if (fs.pool / "luns").is_dir() else []
        plugin.check_alive()
        if left:
            raise SystemExit(f"{fs.kind}: LUN files left after delete: {left}")
        subprocess.run(["fstrim", str(fs.mnt)], check=False, capture_output=True)


# ---- report ----------------------------------------------------------------------------------

def facts(work: Path, fss: list[Fs], sizes: list[int], note: str) -> list[str]:
    out = machine_facts()
    out += [f"- pool `{fs.kind}`: {fs.describe(work)}" for fs in fss]
    out += [
        f"- plugin state (sqlite): {describe_fs(work)}",
        f"- volumes: {', '.join(str(s // GiB) for s in sizes)} GiB, one LUN each (layout=single), "
        f"filled end to end with a repeating 4 MiB random buffer, unpublished",
    ]
    if note:
        out.append(f"- note: {note}")
    return out


def table(rows: list[Row]) -> list[str]:
    out = ["| pool | size GiB | pair methods | snapshot s | calls | pair copy s | snapshot MiB/s "
           "| dd direct s | dd MiB/s | snapshot / dd | cp --reflink s | snapshot / cp --reflink | fill MiB/s |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mib = r.size / MiB
        rl = f"{r.reflink_s:.3f}" if r.reflink_s is not None else "–"
        dd = f"{r.dd_s:.2f} | {mib / r.dd_s:.0f} | {r.snap_s / r.dd_s:.2f}" if r.dd_s else "– | – | –"
        rlx = f"{r.snap_s / r.reflink_s:.0f}×" if r.reflink_s else "–"
        out.append(
            f"| {r.pool} | {r.size // GiB} | {','.join(r.methods)} ({r.state}) | {r.snap_s:.2f} | {r.calls} "
            f"| {r.pair_s:.2f} | {mib / r.snap_s:.0f} | {dd} | {rl} | {rlx} | {mib / r.fill_s:.0f} |")
    return out


def main() -> int:
    ap = arg_parser(__doc__, quick_help="sizes 1,2 GiB",
                    dir_help="where the images and plugin state go (a real disk)")
    ap.add_argument("--sizes", default="", help="comma-separated GiB (default 1,4,16; --quick 1,2)")
    ap.add_argument("--xfs-dd", action="store_true",
                    help="also time dd on the XFS pool (what a host copy would cost there; +~40%% runtime)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: loop devices, mkfs, mount, drop_caches")
    note = ""
    if args.sizes:
        sizes = [int(s) * GiB for s in args.sizes.split(",")]
    elif args.quick:
        sizes = [1 * GiB, 2 * GiB]
    else:
        sizes = [1 * GiB, 4 * GiB, 16 * GiB]
    free = shutil.disk_usage(args.dir).free
    need = lambda ss: 2 * max(ss) + 4 * GiB  # noqa: E731  LUN + dd copy (or snapshot) + metadata
    if free < need(sizes) and not args.sizes and not args.quick:
        sizes = [1 * GiB, 4 * GiB, 8 * GiB]
        note = f"{args.dir} had {free / GiB:.0f} GiB free, short for 16 GiB; scaled down to 1,4,8 GiB"
    if free < need(sizes):
        raise SystemExit(f"{args.dir}: {free / GiB:.0f} GiB free, need {need(sizes) / GiB:.0f} GiB")
    image = max(IMAGE, 2 * max(sizes) + 8 * GiB)

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="csi-virtvol-snapbench-", dir=args.dir))
    rows: list[Row] = []
    try:
        with loop_fs("xfs", work, image) as xfs, loop_fs("ext4", work, image) as ext4:
            fss = [xfs, ext4]
            plugin = Plugin(work=work, arrays={fs.kind: fs.pool for fs in fss}, sock_prefix="virtvol-snapbench")
            try:
                for size in sizes:
                    for fs in fss:
                        print(f"... {fs.kind} {size // GiB} GiB", file=sys.stderr, flush=True)
                        rows.append(measure(plugin, fs, size, xfs_dd=args.xfs_dd))
            finally:
                plugin.close()
            lines = facts(work, fss, sizes, note)
        print("# csi-virtvol snapshot latency: internal copy (XFS reflink) vs host copy (ext4)\n")
        print("\n".join(lines))
        print()
        print("\n".join(table(rows)))
        print("""
- snapshot s: first CreateSnapshot sent until a call answers ready_to_use (calls = how many;
  each call is held by the plugin for up to 8 s, so this is the driver's latency, not an
  external-snapshotter's backoff).  Page cache dropped before it.  The call returns as soon
  as the copy ends (the worker wakes it), so an internal copy's snapshot s is the clone plus
  the RPC and store writes.
- pair methods: per-extent copy methods and final state of the pair record in state.db;
  pair copy s = the pair's ended_at - started_at (the copy alone, without the RPC, the cut
  and the store writes before it).
- dd direct: `dd if=LUN of=<file on the same fs> bs=4M iflag=direct oflag=direct`, cold cache;
  snapshot / dd = host copy ratio (below 1: faster than dd).  Only on ext4 unless --xfs-dd.
- cp --reflink: `cp --reflink=always LUN <file on the same fs>` (XFS), cold cache.
- fill MiB/s: the O_DIRECT write that made the volume dense (the disk's write speed here).""")
        print(f"\nruntime {time.monotonic() - t_start:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
