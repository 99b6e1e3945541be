"""Virtual volumes over qsd arrays and a file pool, through the real plugin (gRPC on a
unix socket): every copy method of the seed on one volume, the node reaching NBD
LUNs, and a differential resync by the source array's dirty bitmap."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_virtvol.backends.qsd import stop_daemon
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import virtvol_pb2 as vpb
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc
from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.ids import ArrayId
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import NODE_ID, Plugin, block_cap, running_plugin, unique

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_snapshots import create_volume, snap_source  # noqa: E402

MiB = 1 << 20
QSD_CAPACITY = 128 * MiB
GRAIN = 64 * 1024  # the qsd driver's dirty-bitmap granularity


@pytest.fixture
def plugin(xfs_mount: Path, tmp_path: Path) -> Iterator[Plugin]:
    """qsd arrays "qa" and "qb" (128 MiB each, their daemons started by the driver) and
    a reflink file pool "fast" on XFS."""
    if os.geteuid() != 0:
        pytest.skip("needs root (FUSE mounts, loop devices)")
    tag = uuid.uuid4().hex[:8]
    fast = xfs_mount / f"fast-{tag}"
    qsd = [{"id": n, "kind": "qsd",
            "params": {"pool": str(tmp_path / n), "start": "true", "capacity": str(QSD_CAPACITY)}}
           for n in ("qa", "qb")]
    try:
        with running_plugin(tmp_path, [("fast", fast, 256 * MiB, {})], extra_arrays=qsd) as p:
            yield p
    finally:
        for a in qsd:
            stop_daemon(ArraySpec(id=ArrayId(str(a["id"])), kind="qsd", params=dict(a["params"])))  # type: ignore[arg-type]
        shutil.rmtree(fast, ignore_errors=True)


def extents(p: Plugin, vid: str) -> list[tuple[str, int]]:
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
        return [(e.array, e.length) for e in rec.value.extents]


def methods(p: Plugin, vid: str) -> list[str]:
    pair = vrpc.PairsStub(p.channel).ListPairs(vpb.ListPairsRequest()).pairs
    return [e.method for x in pair if x.target == vid for e in x.extents]


class Staged:
    """A volume staged and published as a raw block device on this node."""

    def __init__(self, p: Plugin, vid: str, root: Path) -> None:
        self.p, self.vid = p, vid
        self.staging, self.target = root / f"stage-{vid}", root / f"pub-{vid}"
        self.staging.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        p, cap = self.p, block_cap()
        p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=self.vid, node_id=NODE_ID, volume_capability=cap))
        p.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=self.vid, staging_target_path=str(self.staging), volume_capability=cap))
        p.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=self.vid, staging_target_path=str(self.staging), target_path=str(self.target),
            volume_capability=cap))
        return self.target

    def __exit__(self, *exc: object) -> None:
        p = self.p
        p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=self.vid, target_path=str(self.target)))
        p.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=self.vid,
                                                             staging_target_path=str(self.staging)))
        p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=self.vid, node_id=NODE_ID))


def read_volume(p: Plugin, vid: str, root: Path) -> bytes:
    with Staged(p, vid, root) as dev:
        fd = os.open(dev, os.O_RDONLY)  # a fresh staging: a fresh device, no stale page cache
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            buf = bytearray()
            pos = 0
            while pos < size:
                chunk = os.pread(fd, min(4 * MiB, size - pos), pos)
                assert chunk, f"short read at {pos}"
                buf += chunk
                pos += len(chunk)
            return bytes(buf)
        finally:
            os.close(fd)


def image_bytes(p: Plugin, vid: str) -> bytes:
    """A snapshot's content (it cannot be staged), read through its LUNs' addresses:
    a file-pool path, or an NBD export read with nbdcopy."""
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
        out = bytearray()
        for e in rec.value.extents:
            lun = st.get(S.LUNS, f"{e.array}:{e.lun}")
            assert lun is not None
            if lun.value.address.startswith("/"):
                with open(lun.value.address, "rb") as f:
                    data = f.read()
            else:
                data = subprocess.run(["nbdcopy", lun.value.address, "-"], capture_output=True,
                                      check=True).stdout
            out += data[e.offset:e.offset + e.length]
        return bytes(out)


def snapshot(p: Plugin, source: str, *, tag: str = "", **params: str) -> str:
    deadline = time.monotonic() + 180
    while True:
        snap = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(
            name=f"snap-{source}-{tag}-{sorted(params.items())}", source_volume_id=source,
            parameters=params)).snapshot
        if snap.ready_to_use:
            return str(snap.snapshot_id)
        assert time.monotonic() < deadline, "snapshot never became ready"
        time.sleep(0.3)


def nbd_mounts() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if "nbdfuse" in line]


def test_every_copy_method_on_one_volume(plugin: Plugin, tmp_path: Path) -> None:
    p = plugin
    # leave qa 32 MiB so that the volume spans it and the file pool, then make room for copies
    filler = create_volume(p, 96 * MiB, arrays="qa").volume_id
    vol = create_volume(p, 64 * MiB, arrays="qa,fast", layout="concat")
    vid = vol.volume_id
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=filler))
    assert extents(p, vid) == [("qa", 32 * MiB), ("fast", 32 * MiB)]
    payload = os.urandom(64 * MiB)
    with Staged(p, vid, tmp_path) as dev:  # the node reaches the qsd LUN over NBD
        with open(dev, "r+b") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    assert read_volume(p, vid, tmp_path) == payload

    # the snapshot copies each extent inside its own array
    snap = snapshot(p, vid)
    assert methods(p, snap) == ["internal", "internal"]
    # snapshot onto the second qsd: the first array pushes its LUN there itself
    far = snapshot(p, vid, arrays="qb,fast")
    assert methods(p, far) == ["remote", "internal"]
    assert [a for a, _ in extents(p, far)] == ["qb", "fast"]

    # clone onto the second qsd only: remote copy for the qsd extent, host copy for the file one
    c1 = create_volume(p, 64 * MiB, source=snap_source(snap), arrays="qb")
    assert methods(p, c1.volume_id) == ["remote", "host"]
    # clone onto the file pool: host copy from the qsd LUN, reflink for the file extent
    c2 = create_volume(p, 64 * MiB, source=snap_source(snap), arrays="fast")
    assert methods(p, c2.volume_id) == ["host", "internal"]

    # the writes after the cut do not reach the images
    with Staged(p, vid, tmp_path) as dev:
        with open(dev, "r+b") as f:
            f.write(b"\xff" * MiB)
    for copy in (snap, far):
        assert image_bytes(p, copy) == payload, copy
    for copy in (c1.volume_id, c2.volume_id):
        assert read_volume(p, copy, tmp_path) == payload, copy

    for v in (c1.volume_id, c2.volume_id, vid):
        p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v))
    for s in (snap, far):
        p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s))
    assert p.lun_files() == []
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        assert [r.value.id for r in st.list(S.LUNS) if r.value.array in ("qa", "qb")] == []
    for pool in ("qa", "qb"):
        assert [f for f in os.listdir(tmp_path / pool / "luns") if not f.startswith(".")] == []
    assert not [m for m in nbd_mounts() if m.startswith(str(p.data_dir))], "the node left NBD attached"


def test_resync_pushes_only_the_blocks_written_since(plugin: Plugin, tmp_path: Path) -> None:
    p = plugin
    vid = create_volume(p, 32 * MiB, arrays="qa").volume_id
    with Staged(p, vid, tmp_path) as dev:
        with open(dev, "r+b") as f:
            f.write(os.urandom(32 * MiB))
    far = snapshot(p, vid, arrays="qb")
    pairs = vrpc.PairsStub(p.channel)
    first = pairs.ListPairs(vpb.ListPairsRequest(source=vid)).pairs
    assert [(x.target, [e.method for e in x.extents]) for x in first] == [(far, ["remote"])]
    assert first[0].extents[0].bytes_written == 32 * MiB  # the first copy is whole

    # change N scattered 4 KiB blocks, each in its own 64 KiB grain
    rng = random.Random(5)
    grains = rng.sample(range(32 * MiB // GRAIN), 25)
    with Staged(p, vid, tmp_path) as dev:
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            block = bytearray(os.urandom(4096))
            import mmap
            buf = mmap.mmap(-1, 4096)
            buf.write(bytes(block))
            for g in grains:
                os.pwritev(fd, [buf], g * GRAIN + 8192)
        finally:
            os.close(fd)
    now = read_volume(p, vid, tmp_path)
    assert image_bytes(p, far) != now

    done = pairs.ResyncPair(vpb.ResyncPairRequest(target=far)).pair
    assert done.state == "split"
    moved = done.extents[0].bytes_written
    assert moved == len(grains) * GRAIN, f"{moved} bytes moved for {len(grains)} changed grains"
    assert image_bytes(p, far) == now

    # nothing changed since: the next resync moves nothing
    again = pairs.ResyncPair(vpb.ResyncPairRequest(target=far)).pair
    assert again.extents[0].bytes_written == 0
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=far))
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    with pytest.raises(grpc.RpcError) as e:
        pairs.ResyncPair(vpb.ResyncPairRequest(target=far))
    assert e.value.code() is grpc.StatusCode.NOT_FOUND


def test_metadata_delta_between_qsd_snapshots(plugin: Plugin, tmp_path: Path) -> None:
    """GetMetadataDelta on an array whose LUNs are NBD exports (no shared filesystem to
    ask FIEMAP): the allocation maps and a comparison find exactly the written blocks."""
    from csi_virtvol.csi._gen import csi_pb2_grpc as rpc

    p = plugin
    vid = create_volume(p, 16 * MiB, arrays="qa").volume_id
    with Staged(p, vid, tmp_path) as dev:
        with open(dev, "r+b") as f:
            f.write(os.urandom(4 * MiB))
    a = snapshot(p, vid)
    changes = [(64 * 1024, 4096), (3 * MiB + 8192, 8192), (12 * MiB, 4096)]  # one into a hole
    with Staged(p, vid, tmp_path) as dev:
        with open(dev, "r+b") as f:
            for off, n in changes:
                f.seek(off)
                f.write(os.urandom(n))
    b = snapshot(p, vid, tag="b")
    meta = rpc.SnapshotMetadataStub(p.channel)
    got = [(m.byte_offset, m.size_bytes) for r in meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=a, target_snapshot_id=b)) for m in r.block_metadata]
    assert got == changes
    alloc = [(m.byte_offset, m.size_bytes) for r in meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=b)) for m in r.block_metadata]
    assert any(o <= 12 * MiB and 12 * MiB + 4096 <= o + n for o, n in alloc)
    assert not any(o < 8 * MiB + 4096 and 8 * MiB < o + n for o, n in alloc), "a never-written hole"
