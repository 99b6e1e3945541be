"""Pods that start mid-copy, and volumes unstaged mid-copy (issue 9 scope 4), through the
real plugin over gRPC on file pools on ext4 (every extent a host copy).

- An unpublished source is fenced for its snapshot's copy (its LUNs access-prohibited).  A
  pod that starts meanwhile (ControllerPublish + NodeStage + NodePublish, then writes) is
  not held back for the copy: the node cuts the volume before anything writes it and the
  copy moves onto the cut's view.  The snapshot still holds the data as it was.
- A published source's snapshot reads a cut on its node.  Unstaging the volume mid-copy
  keeps what the copy reads (the daemon and its store) until the copy ends, then all goes;
  staging it again mid-copy continues the same cut.
"""
from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from csi_virtvol import failpoints
from harness.plugin import NODE_ID, Plugin, _teardown_node, block_cap, mount_cap, running_plugin, unique
from test_groups import node_plugin

MiB = 1 << 20
SIZE = 256 * MiB
BANDWIDTH = "16Mi"   # the host copy of SIZE takes ~16 s: long enough to act in the middle of it
QUICK = 10.0         # seconds: a pod start that waits for the copy would take longer than the copy

pytestmark = pytest.mark.root


@pytest.fixture
def plugin(ext4_mount: Path, tmp_path: Path) -> Iterator[Plugin]:
    tag = unique("s")
    with running_plugin(tmp_path / "plugin", [("pool-a", ext4_mount / f"a-{tag}", 0, {}),
                                              ("pool-b", ext4_mount / f"b-{tag}", 0, {})]) as p:
        yield p


def volume_bytes(p: Plugin, vid: str, length: int = 0) -> bytes:
    """The volume's bytes, read from its LUN files (what is really on the arrays)."""
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
        extents = rec.value.extents
    out = bytearray()
    for e in extents:
        with open(p.pools[e.array] / "luns" / f"{e.lun}.img", "rb") as f:
            f.seek(e.offset)
            data = f.read(e.length)
        out += data + bytes(e.length - len(data))
    return bytes(out[:length] if length else out)


def fill_luns(p: Plugin, vid: str) -> None:
    """Random data in the volume, written where the arrays keep it (its LUN files)."""
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
    for e in rec.value.extents:
        with open(p.pools[e.array] / "luns" / f"{e.lun}.img", "r+b") as f:
            f.seek(e.offset)
            f.write(os.urandom(e.length))


def pair_of(p: Plugin, sid: str):  # type: ignore[no-untyped-def]
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.PAIRS, sid)
        return rec.value if rec is not None else None


def copying(p: Plugin, sid: str) -> bool:
    pair = pair_of(p, sid)
    return pair is not None and pair.state.value == "copying"


def wait_copy_started(p: Plugin, sid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pair = pair_of(p, sid)
        if pair is not None and pair.targets[0].bytes_done > 0:
            assert pair.state.value == "copying"
            return
        time.sleep(0.1)
    raise AssertionError("the copy did not start")


def wait_ready(p: Plugin, name: str, source: str, timeout: float = 180) -> pb.Snapshot:
    deadline = time.monotonic() + timeout
    while True:
        snap = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=source)).snapshot
        if snap.ready_to_use:
            return snap
        assert time.monotonic() < deadline, f"snapshot {name} never became ready: {pair_of(p, snap.snapshot_id)}"
        time.sleep(0.3)


def slow_copies(p: Plugin, vid: str) -> None:
    p.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vid, mutable_parameters={"copyBandwidth": BANDWIDTH}))


def publish_and_stage(p: Plugin, vid: str, cap: pb.VolumeCapability, staging: Path, target: Path) -> None:
    ctx = p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=NODE_ID, volume_capability=cap)).publish_context
    staging.mkdir(exist_ok=True)
    p.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
    p.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), target_path=str(target), volume_capability=cap))


def unpublish_and_unstage(p: Plugin, vid: str, staging: Path, target: Path) -> None:
    p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)))
    p.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID))


def write_at(path: Path, chunks: dict[int, bytes]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, data in chunks.items():
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def leftovers(data_dir: Path) -> list[str]:
    """What a cut or a staged volume leaves on this node: cut stores, tracking bitmaps, views,
    volume workdirs, FUSE mounts, concatenation daemons and loop devices under `data_dir`."""
    vols = str(data_dir / "node" / "volumes")
    # glob.glob, not Path.glob: a mount point whose daemon just died answers ENOTCONN for a moment
    out = sorted(glob.glob(f"{vols}/*/cuts/*") + glob.glob(f"{vols}/*/tracking/*") + glob.glob(f"{vols}/*/mnt/cut-*")
                 + glob.glob(f"{vols}/*"))
    with open("/proc/self/mountinfo") as f:
        out += [f"mount {m}" for m in (line.split()[4] for line in f) if m.startswith(str(data_dir))]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"csi_virtvol.node.concatfs" in cmd and any(str(data_dir).encode() in c for c in cmd):
                out.append(f"daemon {pid}")
    for lo in Path("/sys/block").glob("loop*"):
        try:
            back = (lo / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if back.startswith(str(data_dir)):
            out.append(f"loop {lo.name} -> {back}")
    return out


def wait_no_leftovers(data_dir: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (left := leftovers(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not left, left


def wait_cuts_gone(data_dir: Path, timeout: float = 10) -> None:
    """The cuts' stores and views go once their copies end (the volume may stay staged)."""
    def cuts() -> list[str]:
        vols = str(data_dir / "node" / "volumes")
        return glob.glob(f"{vols}/*/cuts/*") + glob.glob(f"{vols}/*/mnt/cut-*")
    deadline = time.monotonic() + timeout
    while (left := cuts()) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not left, left


def attached_users(p: Plugin) -> list[str]:
    users = p.data_dir / "node" / "attach" / "users"
    return sorted(os.listdir(users)) if users.is_dir() else []


@pytest.mark.parametrize("access", ["block", "mount"])
def test_a_pod_starting_mid_copy_of_an_unpublished_source_is_not_held_back(access: str, plugin: Plugin,
                                                                          tmp_path: Path) -> None:
    p = plugin
    cap = block_cap() if access == "block" else mount_cap("ext4")
    vid = p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=SIZE), volume_capabilities=[cap])).volume.volume_id
    staging, target = p.data_dir.parent / "staging", p.data_dir.parent / "target"  # the harness cleans up there
    if access == "block":  # known data, written where the arrays keep it
        fill_luns(p, vid)
    else:  # a filesystem holding a big file, made by a pod that has since ended
        publish_and_stage(p, vid, cap, staging, target)
        with open(target / "data.bin", "wb") as f:
            f.write(os.urandom(SIZE * 3 // 4))
        unpublish_and_unstage(p, vid, staging, target)
    before = volume_bytes(p, vid)
    slow_copies(p, vid)
    name = unique("snap")
    sid = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vid)).snapshot.snapshot_id
    wait_copy_started(p, sid)
    assert pair_of(p, sid).fence.value == "prohibited"

    # the pod starts mid-copy and writes
    t0 = time.monotonic()
    publish_and_stage(p, vid, cap, staging, target)
    if access == "block":
        payload = {off: os.urandom(MiB) for off in (0, SIZE // 3, SIZE - MiB)}
        write_at(target, payload)
    else:
        with open(target / "data.bin", "r+b") as f:
            f.write(os.urandom(8 * MiB))
            f.flush()
            os.fsync(f.fileno())
        with open(target / "new.bin", "wb") as f:
            f.write(b"written mid-copy" * 4096)
            f.flush()
            os.fsync(f.fileno())
    took = time.monotonic() - t0
    still = copying(p, sid)
    pair = pair_of(p, sid)
    print(f"publish+stage+publish+write mid-copy ({access}): {took:.2f}s; copy still running: {still}; "
          f"{pair.targets[0].bytes_done >> 20} of {SIZE >> 20} MiB copied")
    assert still, "the pod's writes were acknowledged only after the copy ended: it was held back"
    assert took < QUICK, f"the pod start took {took:.1f}s"
    assert pair.fence.value == "cut" and pair.fence_node == NODE_ID and pair.cut_view

    snap = wait_ready(p, name, vid)
    assert volume_bytes(p, snap.snapshot_id, SIZE) == before, "the snapshot is not the source as it was"
    now = volume_bytes(p, vid)
    if access == "block":
        for off, data in payload.items():
            assert now[off:off + len(data)] == data, f"the pod's write at {off} is not on the source"
    else:
        assert (target / "new.bin").read_bytes() == b"written mid-copy" * 4096
        assert now != before
    wait_cuts_gone(p.data_dir)
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        assert {r.value.state.value for r in st.list(S.LUNS)} == {"in-use"}
    unpublish_and_unstage(p, vid, staging, target)
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    wait_no_leftovers(p.data_dir)
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert p.lun_files() == []


def _published_source_with_a_cut(p: Plugin, staging: Path, target: Path) -> tuple[str, str, str, bytes]:
    """A staged raw block volume holding random data, and a snapshot of it mid-copy."""
    cap = block_cap()
    vid = p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=SIZE), volume_capabilities=[cap])).volume.volume_id
    publish_and_stage(p, vid, cap, staging, target)
    write_at(target, {0: os.urandom(SIZE)})
    slow_copies(p, vid)
    at_cut = volume_bytes(p, vid)
    name = unique("snap")
    sid = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vid)).snapshot.snapshot_id
    wait_copy_started(p, sid)
    assert pair_of(p, sid).fence.value == "cut"
    write_at(target, {off: os.urandom(2 * MiB) for off in range(0, SIZE, SIZE // 8)})   # preserved first
    return vid, name, sid, at_cut


def test_unstaging_mid_copy_keeps_the_cut_until_the_copy_ends_then_all_goes(plugin: Plugin,
                                                                             tmp_path: Path) -> None:
    p = plugin
    staging, target = p.data_dir.parent / "staging", p.data_dir.parent / "target"  # the harness cleans up there
    vid, name, sid, at_cut = _published_source_with_a_cut(p, staging, target)
    after = volume_bytes(p, vid)
    unpublish_and_unstage(p, vid, staging, target)
    assert copying(p, sid), "the copy ended before the unstage: nothing was tested"
    assert not [x for x in leftovers(p.data_dir) if x.startswith("loop ")], "the volume's device stayed"
    with node_plugin(p, "other-node"):   # only this node may write it until the copy ends
        with pytest.raises(grpc.RpcError) as e:
            p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
                volume_id=vid, node_id="other-node", volume_capability=block_cap()))
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert f"on node {NODE_ID}" in (e.value.details() or "")
    snap = wait_ready(p, name, vid)
    assert volume_bytes(p, snap.snapshot_id, SIZE) == at_cut, "the snapshot is not the source at the cut"
    assert volume_bytes(p, vid) == after, "the source changed while it was unstaged"
    wait_no_leftovers(p.data_dir)   # the daemon, its store, its mount: gone once the copy ended
    assert attached_users(p) == [], "the volume's LUNs stayed attached to the node"
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert p.lun_files() == []


def test_staging_again_mid_copy_continues_the_same_cut(plugin: Plugin, tmp_path: Path) -> None:
    p = plugin
    staging, target = p.data_dir.parent / "staging", p.data_dir.parent / "target"  # the harness cleans up there
    vid, name, sid, at_cut = _published_source_with_a_cut(p, staging, target)
    unpublish_and_unstage(p, vid, staging, target)
    cut_id = pair_of(p, sid).cut_id
    t0 = time.monotonic()
    publish_and_stage(p, vid, block_cap(), staging, target)
    last = {off: os.urandom(MiB) for off in range(MiB, SIZE, SIZE // 5)}
    write_at(target, last)
    took = time.monotonic() - t0
    assert copying(p, sid), "the copy ended before the volume was staged again: nothing was tested"
    assert took < QUICK, f"staging again took {took:.1f}s"
    assert pair_of(p, sid).cut_id == cut_id and pair_of(p, sid).fence.value == "cut"
    snap = wait_ready(p, name, vid)
    assert volume_bytes(p, snap.snapshot_id, SIZE) == at_cut, "the snapshot is not the source at the cut"
    now = volume_bytes(p, vid)
    for off, data in last.items():
        assert now[off:off + len(data)] == data
    wait_cuts_gone(p.data_dir)
    unpublish_and_unstage(p, vid, staging, target)
    wait_no_leftovers(p.data_dir)
    assert attached_users(p) == []
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert p.lun_files() == []


def test_a_pod_that_moves_to_another_node_before_it_stages_gets_the_cut_there(plugin: Plugin) -> None:
    """Published mid-copy to one node, unpublished before that node staged it, published to
    another: the cut goes to the node that stages it, never to none (its writes would reach
    LUNs the copy still reads)."""
    p = plugin
    cap = block_cap()
    staging, target = p.data_dir.parent / "staging", p.data_dir.parent / "target"
    vid = p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=SIZE), volume_capabilities=[cap])).volume.volume_id
    fill_luns(p, vid)
    before = volume_bytes(p, vid)
    slow_copies(p, vid)
    name = unique("snap")
    sid = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vid)).snapshot.snapshot_id
    wait_copy_started(p, sid)
    with node_plugin(p, "other-node"):
        p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id="other-node", volume_capability=cap))
        assert pair_of(p, sid).fence_node == "other-node"
        p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid,
                                                                                   node_id="other-node"))
    publish_and_stage(p, vid, cap, staging, target)
    write_at(target, {0: os.urandom(4 * MiB)})
    assert copying(p, sid), "the copy ended before the pod wrote: nothing was tested"
    pair = pair_of(p, sid)
    assert pair.fence.value == "cut" and pair.fence_node == NODE_ID
    snap = wait_ready(p, name, vid)
    assert volume_bytes(p, snap.snapshot_id, SIZE) == before, "the pod's writes reached the snapshot"
    unpublish_and_unstage(p, vid, staging, target)
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    wait_no_leftovers(p.data_dir)
    assert p.lun_files() == []


def test_a_stop_right_after_the_snapshot_and_volume_go_leaves_nothing(ext4_mount: Path, tmp_path: Path) -> None:
    """DeleteSnapshot mid-copy, then the volume unstaged and deleted, then the plugin stopped
    at once (a Ctrl-C of the demo, a DaemonSet rollout): the cut the unstage kept for the
    copy, and the composition with it, go before the plugin ends, even if its last scan of
    the pairs read them before the snapshot went (cut-node-scanned holds that scan open)."""
    tag = unique("s")
    workdir = tmp_path / "plugin"
    pools = [("pool-a", ext4_mount / f"a-{tag}", 0, {}), ("pool-b", ext4_mount / f"b-{tag}", 0, {})]
    try:
        with running_plugin(workdir, pools, teardown_node=False) as p:
            staging, target = workdir / "staging", workdir / "target"
            vid, _, sid, _ = _published_source_with_a_cut(p, staging, target)
            with failpoints.armed("cut-node-scanned", "sleep:3"):
                time.sleep(1.5)   # a scan has read the pairs, the snapshot's among them, and waits
                p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid))
                unpublish_and_unstage(p, vid, staging, target)
                p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
            data_dir = p.data_dir
        assert leftovers(data_dir) == []
    finally:
        _teardown_node(str(workdir / "data" / "node"), workdir)
