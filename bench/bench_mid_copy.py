#!/usr/bin/env python3
"""A pod that starts while its volume is being copied: how long until its first write is done.

The plugin (a subprocess, two file pools on this machine's disk: host copies) holds an
unpublished raw block volume full of random data.  For each size, in one run:

  baseline   ControllerPublish + NodeStage + NodePublish + one 4 KiB write and fdatasync,
             with no copy running (then all undone)
  mid-copy   the same, once a snapshot of the volume is copying (its LUNs read directly)

A ControllerPublish answered FAILED_PRECONDITION (the source access-prohibited while a copy
reads it: the behaviour before issue 9 scope 4) is tried again every 0.25 s, as the
external-attacher would (it backs off, so a real pod waits at least as long).  The copy runs
at disk speed (no copyBandwidth).  Reported: both times, their ratio, the snapshot's time, and
whether the copy was still running when the pod's write was done.

  .venv/bin/python bench/bench_mid_copy.py [--sizes 1,4] [--dir /var/tmp]
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Plugin, describe_fs, machine_facts  # noqa: E402

import grpc  # noqa: E402

from csi_virtvol.csi._gen import csi_pb2 as pb  # noqa: E402
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc  # noqa: E402
from csi_virtvol.store import base as S  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
NODE = "bench-node"


def block_cap() -> pb.VolumeCapability:
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    cap.block.SetInParent()
    return cap


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="volume sizes in GiB")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-mid-copy-", dir=args.dir))
    for line in machine_facts():
        print(line)
    print(f"pools on {describe_fs(work)}")
    (work / "a").mkdir()
    (work / "b").mkdir()
    p = Plugin(work=work, arrays={"pool-a": work / "a", "pool-b": work / "b"})
    node = rpc.NodeStub(p.channel)
    cap = block_cap()

    def start_pod(vid: str, tag: str) -> float:
        """Seconds from ControllerPublish to the pod's first write done."""
        st, tg = work / f"{tag}-staging", work / f"{tag}-target"
        st.mkdir()
        t0 = time.monotonic()
        while True:
            try:
                ctx = p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
                    volume_id=vid, node_id=NODE, volume_capability=cap)).publish_context
                break
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                time.sleep(0.25)
        node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(st),
                                                       volume_capability=cap, publish_context=ctx))
        node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=str(st),
                                                           target_path=str(tg), volume_capability=cap))
        fd = os.open(tg, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(4096), 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return time.monotonic() - t0

    def stop_pod(vid: str, tag: str) -> None:
        st, tg = work / f"{tag}-staging", work / f"{tag}-target"
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(tg)))
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(st)))
        p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE))

    def copying(sid: str) -> tuple[bool, int]:
        with p.store() as st:
            rec = st.get(S.PAIRS, sid)
        if rec is None:
            return False, 0
        return rec.value.state.value == "copying", rec.value.targets[0].bytes_done

    try:
        print("\n| volume | pod start, no copy | pod start, mid-copy | ratio | snapshot | copy still running at the write |")
        print("|---|---|---|---|---|---|")
        for gib in (int(x) for x in args.sizes.split(",")):
            vid = p.controller.CreateVolume(pb.CreateVolumeRequest(
                name=f"v{gib}", capacity_range=pb.CapacityRange(required_bytes=gib * GiB),
                volume_capabilities=[cap])).volume.volume_id
            with p.store() as st:
                rec = st.get(S.VOLUMES, vid)
            assert rec is not None
            for e in rec.value.extents:
                with open(work / ("a" if e.array == "pool-a" else "b") / "luns" / f"{e.lun}.img", "r+b") as f:
                    f.seek(e.offset)
                    for _ in range(e.length // (64 * MiB)):
                        f.write(os.urandom(64 * MiB))
                    os.fsync(f.fileno())
            base = start_pod(vid, f"b{gib}")
            stop_pod(vid, f"b{gib}")
            t0 = time.monotonic()
            sid = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(
                name=f"s{gib}", source_volume_id=vid)).snapshot.snapshot_id
            while copying(sid)[1] == 0:
                time.sleep(0.02)
            mid = start_pod(vid, f"m{gib}")
            still = copying(sid)[0]
            while not p.controller.CreateSnapshot(pb.CreateSnapshotRequest(
                    name=f"s{gib}", source_volume_id=vid)).snapshot.ready_to_use:
                time.sleep(0.1)
            took = time.monotonic() - t0
            stop_pod(vid, f"m{gib}")
            print(f"| {gib} GiB | {base * 1000:.0f} ms | {mid * 1000:.0f} ms | {mid / base:.1f}x | {took:.1f} s "
                  f"| {'yes' if still else 'no'} |")
            p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid))
            while True:
                try:
                    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
                    break
                except grpc.RpcError as e:   # ABORTED: the node is taking apart what the cut kept
                    if e.code() is not grpc.StatusCode.ABORTED:
                        raise
                    time.sleep(0.2)
    finally:
        p.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
