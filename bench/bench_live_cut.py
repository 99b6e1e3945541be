#!/usr/bin/env python3
"""Live cuts: an application writing through a snapshot of its in-use volume, and resync.

The plugin (a subprocess, two file pools on this machine's disk: host copies) serves a
raw block volume that a writer uses: it writes a 4 KiB record and fdatasyncs it, then
pauses 3 ms, in a loop.  For each size, in one run:

  baseline   the writer for BASE seconds, no snapshot
  snapshot   the same writer while a snapshot of the volume is cut and host-copied

and reports the writer's longest stall, its p99 gap and its records per second, and the
snapshot's time.  Then, on a 1 GiB volume filled with random data: a snapshot (the full
copy), 5% of its 64 KiB chunks rewritten, and `pair resync` of that snapshot.

  .venv/bin/python bench/bench_live_cut.py [--sizes 1,4,16] [--dir /var/tmp]
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Plugin, describe_fs, machine_facts  # noqa: E402

from csi_virtvol.csi._gen import csi_pb2 as pb  # noqa: E402
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc  # noqa: E402
from csi_virtvol.csi._gen import virtvol_pb2 as vpb  # noqa: E402
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
RECORD = 4096
PERIOD = 0.003
BASE = 5.0
NODE = "bench-node"


def block_cap() -> pb.VolumeCapability:
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    cap.block.SetInParent()
    return cap


class Writer:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY)
        self.times: list[float] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        rec = os.urandom(RECORD)
        while not self.stop.is_set():
            os.pwrite(self.fd, rec, (i % 4096) * RECORD)
            os.fdatasync(self.fd)
            self.times.append(time.monotonic())
            i += 1
            time.sleep(PERIOD)

    def __enter__(self) -> Writer:
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.t.join()
        os.close(self.fd)

    def window(self, a: float, b: float) -> tuple[float, float, float]:
        ts = [t for t in self.times if a <= t <= b]
        gaps = sorted(y - x for x, y in zip(ts, ts[1:]))
        p99 = gaps[int(len(gaps) * 0.99)] if gaps else 0.0
        return (gaps[-1] if gaps else 0.0), p99, len(ts) / (b - a)


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16", help="volume sizes in GiB")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-live-cut-", dir=args.dir))
    for line in machine_facts():
        print(line)
    print(f"pools on {describe_fs(work)}")
    (work / "a").mkdir()
    (work / "b").mkdir()
    p = Plugin(work=work, arrays={"pool-a": work / "a", "pool-b": work / "b"})
    node = rpc.NodeStub(p.channel)
    pairs = vrpc.PairsStub(p.channel)
    staged: list[tuple[str, Path, Path]] = []

    def volume(size: int, name: str) -> tuple[str, Path]:
        cap = block_cap()
        vol = p.controller.CreateVolume(pb.CreateVolumeRequest(
            name=name, capacity_range=pb.CapacityRange(required_bytes=size), volume_capabilities=[cap])).volume
        ctx = p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE, volume_capability=cap)).publish_context
        st, tg = work / f"{name}-staging", work / f"{name}-target"
        st.mkdir()
        node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(st),
                                                       volume_capability=cap, publish_context=ctx))
        node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(st),
                                                           target_path=str(tg), volume_capability=cap))
        staged.append((vol.volume_id, st, tg))
        return vol.volume_id, tg

    def snapshot(vid: str, name: str) -> float:
        t0 = time.monotonic()
        while True:
            s = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vid)).snapshot
            if s.ready_to_use:
                return time.monotonic() - t0
            time.sleep(0.1)

    try:
        print("\n| volume | run | longest stall | p99 gap | records/s | snapshot |")
        print("|---|---|---|---|---|---|")
        for gib in (int(x) for x in args.sizes.split(",")):
            vid, dev = volume(gib * GiB, f"w{gib}")
            with Writer(dev) as w:
                time.sleep(0.5)
                a = time.monotonic()
                time.sleep(BASE)
                b = time.monotonic()
                took = snapshot(vid, f"s{gib}")
                c = time.monotonic()
            base, snap = w.window(a, b), w.window(b, c)
            print(f"| {gib} GiB | no snapshot | {base[0]*1000:.0f} ms | {base[1]*1000:.1f} ms | {base[2]:.0f} | |")
            print(f"| {gib} GiB | snapshot | {snap[0]*1000:.0f} ms | {snap[1]*1000:.1f} ms | {snap[2]:.0f} "
                  f"({snap[2] / base[2]:.2f}x) | {took:.1f} s |")
        vid, dev = volume(1 * GiB, "r1")
        fd = os.open(dev, os.O_WRONLY)
        for off in range(0, GiB, 64 * MiB):
            os.pwrite(fd, os.urandom(64 * MiB), off)
        os.fsync(fd)
        full = snapshot(vid, "rs1")
        rng = random.Random(1)
        chunks = rng.sample(range(GiB // 65536), GiB // 65536 // 20)
        for k in chunks:
            os.pwrite(fd, os.urandom(4096), k * 65536)
        os.fsync(fd)
        os.close(fd)
        sid = [s for s in p.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=vid)).entries][0]
        t0 = time.monotonic()
        pairs.ResyncPair(vpb.ResyncPairRequest(target=sid.snapshot.snapshot_id))
        resync = time.monotonic() - t0
        print(f"\nresync of 1 GiB after 5% of its chunks changed: {resync:.2f} s against the full copy's "
              f"{full:.2f} s: {resync / full:.3f}x")
    finally:
        for vid, st, tg in reversed(staged):
            try:
                node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(tg)))
                node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(st)))
            except Exception as e:  # noqa: BLE001 - report and go on cleaning
                print(f"cleanup of {vid}: {e}")
        p.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
