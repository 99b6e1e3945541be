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


def test_remote_copy_of_a_volume_in_use_is_cut_at_the_instant(plugin: Plugin, tmp_path: Path) -> None:
    """A volume on qa in use as a raw block device, a writer fdatasyncing numbered records
    throughout a snapshot onto qb: qa pushes the LUN itself (blockdev-backup, point-in-time
    from the moment the job starts).  The driver starts it at the cut, the writes held, so
    the image holds exactly the records acknowledged at the cut (and at most the one in
    flight).  The worker that follows the copy is slowed 1.5 s (failpoint
    copy-remote-starting): a push started there carries the records written meanwhile."""
    from csi_virtvol import failpoints
    from test_live_cut import Writer, _check_image, prefix_length

    p = plugin
    vid = create_volume(p, 32 * MiB, arrays="qa").volume_id
    with Staged(p, vid, tmp_path) as dev:
        with Writer(dev, create=False) as w:
            while len(w.acked) < 50:
                time.sleep(0.01)
            with failpoints.armed("copy-remote-starting", "sleep:1.5"):
                far = snapshot(p, vid, arrays="qb")
            time.sleep(0.3)
    assert methods(p, far) == ["remote"]
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.PAIRS, far)
        assert rec is not None
        cut_at, fence = rec.value.cut_at, rec.value.fence.value
    assert fence == "released"
    image = image_bytes(p, far)
    n = prefix_length(image)
    after = sum(1 for _, t in w.acked if t > cut_at)
    print(f"remote copy of a volume in use: {n} records in the image, {after} acknowledged after the cut")
    _check_image(image, w.acked, cut_at)
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=far))
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


def _qsd_jobs(pool: Path) -> list[dict[str, object]]:
    from csi_virtvol.backends.qmp import qmp_session

    with qmp_session(str(pool / "qmp.sock")) as qmp:
        return list(qmp.execute("query-jobs"))


def _lose_the_job(pool: Path) -> None:
    """The source array forgets its remote copy (as a daemon restart does): wait for the job,
    then cancel and dismiss it behind the driver's back."""
    from csi_virtvol.backends.qmp import qmp_session

    deadline = time.monotonic() + 10
    while not (jobs := _qsd_jobs(pool)):
        assert time.monotonic() < deadline, "no remote copy was started"
        time.sleep(0.02)
    with qmp_session(str(pool / "qmp.sock")) as qmp:
        for job in jobs:
            try:
                qmp.execute("job-cancel", {"id": job["id"]})
            except Exception:  # concluded already
                pass
            while next(j for j in qmp.execute("query-jobs") if j["id"] == job["id"])["status"] != "concluded":
                time.sleep(0.02)
            qmp.execute("job-dismiss", {"id": job["id"]})


def test_a_lost_remote_copy_of_a_volume_in_use_fails_instead_of_pushing_again(plugin: Plugin,
                                                                              tmp_path: Path) -> None:
    """The push started at the cut of a volume in use vanishes from its array before it is
    followed: pushing again would copy what was written since the cut, so the snapshot fails
    with the reason and nothing is pushed again; the next CreateSnapshot makes a new cut (its
    push finds the old one's target node, which the job left: a crash between dismissing the
    job and removing its node leaves that too)."""
    from csi_virtvol import failpoints
    from test_live_cut import Writer, _check_image

    p = plugin
    vid = create_volume(p, 32 * MiB, arrays="qa").volume_id
    name = unique("far")
    req = pb.CreateSnapshotRequest(name=name, source_volume_id=vid, parameters={"arrays": "qb"})
    with Staged(p, vid, tmp_path) as dev:
        with Writer(dev, create=False) as w:
            while len(w.acked) < 50:
                time.sleep(0.01)
            with failpoints.armed("copy-remote-started", "sleep:1.5"):
                sid = p.controller.CreateSnapshot(req).snapshot.snapshot_id
                _lose_the_job(tmp_path / "qa")
                deadline = time.monotonic() + 30
                while True:
                    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
                        rec = st.get(S.PAIRS, sid)
                        assert rec is not None
                    if rec.value.state.value == "failed":
                        break
                    assert time.monotonic() < deadline, "the snapshot did not fail (was the lost push made again?)"
                    time.sleep(0.1)
            reason = rec.value.targets[0].reason
            assert "not pushed again" in reason, reason
            time.sleep(0.5)
            assert _qsd_jobs(tmp_path / "qa") == [], "the source array was made to push the moved-on source again"
            deadline = time.monotonic() + 60
            while not (snap := p.controller.CreateSnapshot(req).snapshot).ready_to_use:
                assert time.monotonic() < deadline, "the snapshot made again never became ready"
                time.sleep(0.3)
            time.sleep(0.3)
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.PAIRS, snap.snapshot_id)
        assert rec is not None
    _check_image(image_bytes(p, snap.snapshot_id), w.acked, rec.value.cut_at)
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


def test_a_lost_remote_copy_of_an_unpublished_volume_is_pushed_again(plugin: Plugin, tmp_path: Path) -> None:
    """Unpublished, the source's LUNs are access-prohibited until the copy ends: a push that
    vanishes is started again and the snapshot completes, equal to the source."""
    from csi_virtvol import failpoints

    p = plugin
    vid = create_volume(p, 32 * MiB, arrays="qa").volume_id
    payload = os.urandom(32 * MiB)
    with Staged(p, vid, tmp_path) as dev:
        with open(dev, "r+b") as f:
            f.write(payload)
    name = unique("far")
    req = pb.CreateSnapshotRequest(name=name, source_volume_id=vid, parameters={"arrays": "qb"})
    with failpoints.armed("copy-remote-started", "sleep:1.5"):
        p.controller.CreateSnapshot(req)
        _lose_the_job(tmp_path / "qa")
        deadline = time.monotonic() + 60
        while not (snap := p.controller.CreateSnapshot(req).snapshot).ready_to_use:
            assert time.monotonic() < deadline, "the snapshot never became ready"
            time.sleep(0.3)
    assert methods(p, snap.snapshot_id) == ["remote"]
    assert image_bytes(p, snap.snapshot_id) == payload
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


def test_group_of_volumes_in_use_with_a_remote_copied_member_is_one_instant(plugin: Plugin,
                                                                            tmp_path: Path) -> None:
    """A group snapshot onto qb of a qa volume (pushed by qa: remote copy) and a file-pool volume
    (host copy), both raw block in use, one writer alternating between them (record n to A when
    even, to B when odd, each after the one before was acknowledged).  The push is started inside
    the group's hold, so a record of either never appears in its image without every earlier one
    of the other; the worker is slowed 1.5 s (copy-remote-starting), so a push started there would
    carry records written long after B's cut."""
    import threading

    from csi_virtvol import failpoints
    from test_groups import BLOCK, _record, _records

    p = plugin
    a = create_volume(p, 32 * MiB, arrays="qa").volume_id
    b = create_volume(p, 32 * MiB, arrays="fast").volume_id
    acked: list[int] = []
    stop = threading.Event()
    failure: list[BaseException] = []
    with Staged(p, a, tmp_path) as dev_a, Staged(p, b, tmp_path) as dev_b:
        def writer() -> None:
            fds = [os.open(d, os.O_WRONLY) for d in (dev_a, dev_b)]
            try:
                n = 0
                while not stop.is_set():
                    os.pwrite(fds[n % 2], _record(n), (n // 2) * BLOCK)
                    os.fdatasync(fds[n % 2])
                    acked.append(n)
                    n += 1
                    time.sleep(0.002)
            except BaseException as e:
                failure.append(e)
            finally:
                for fd in fds:
                    os.close(fd)

        w = threading.Thread(target=writer)
        w.start()
        try:
            while len(acked) < 100:
                time.sleep(0.01)
            req = pb.CreateVolumeGroupSnapshotRequest(name=unique("group"), source_volume_ids=[a, b],
                                                      parameters={"arrays": "qb"})
            with failpoints.armed("copy-remote-starting", "sleep:1.5"):
                deadline = time.monotonic() + 120
                while not (g := p.groups.CreateVolumeGroupSnapshot(req).group_snapshot).ready_to_use:
                    assert time.monotonic() < deadline, "the group never became ready"
                    time.sleep(0.3)
            time.sleep(0.3)
        finally:
            stop.set()
            w.join()
    assert not failure, failure
    by_source = {s.source_volume_id: s.snapshot_id for s in g.snapshots}
    assert methods(p, by_source[a]) == ["remote"] and methods(p, by_source[b]) == ["host"]
    in_a = _records(image_bytes(p, by_source[a]))
    in_b = _records(image_bytes(p, by_source[b]))
    assert in_a == list(range(0, 2 * len(in_a), 2)) and in_b == list(range(1, 2 * len(in_b), 2))
    max_a, max_b = in_a[-1], in_b[-1]
    assert max_a >= 100 and acked[-1] > max(max_a, max_b) + 100, "the writer must run on both sides of the cut"
    assert max_b <= max_a + 1, f"B holds record {max_b}, but A lacks record {max_b - 1} written before it"
    assert max_a <= max_b + 1, f"A holds record {max_a}, but B lacks record {max_a - 1} written before it"
    p.groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id, snapshot_ids=list(by_source.values())))
    for v in (a, b):
        p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v))
