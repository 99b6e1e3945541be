"""Group snapshots (CSI GroupController) over gRPC: several volumes, on several
arrays and nodes, cut at one instant; and nothing half-made when one member fails."""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from csi_virtvol import app
from csi_virtvol.config import load_config
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import NODE_ID, Plugin, block_cap, mount_cap, running_plugin, unique
from loopfs import loop_filesystem

MiB = 1 << 20
BLOCK = 4096
Code = grpc.StatusCode
NODE_2 = "test-node-2"


def _record(n: int) -> bytes:
    head = f"virtvol-group-seq {n:012d} ".encode()
    return head + bytes([n % 251]) * (BLOCK - len(head))


def _records(image: bytes) -> list[int]:
    """The sequence numbers of the whole records at the start of `image`; the rest must be zeros."""
    out = []
    k = 0
    while (k + 1) * BLOCK <= len(image):
        blk = image[k * BLOCK:(k + 1) * BLOCK]
        if not blk.startswith(b"virtvol-group-seq "):
            break
        n = int(blk[18:30])
        assert blk == _record(n), f"record {k} is torn"
        out.append(n)
        k += 1
    tail = image[k * BLOCK:]
    assert tail.count(0) == len(tail), f"the image holds a torn or foreign block after record {k}"
    return out


@contextmanager
def node_plugin(plugin: Plugin, node_id: str) -> Iterator[rpc.NodeStub]:
    """A second node plugin (mode node) on the same state store: the volume's other node."""
    sock = f"/tmp/virtvol-{uuid.uuid4().hex[:12]}.sock"
    config = load_config(endpoint=f"unix://{sock}", data_dir=str(plugin.data_dir), node_id=node_id,
                         mode="node", config_file=str(plugin.data_dir.parent / "config.yaml"))
    stop = threading.Event()
    t = threading.Thread(target=app.serve, args=(config,), kwargs={"stop": stop}, daemon=True)
    t.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield rpc.NodeStub(channel)
    finally:
        channel.close()
        stop.set()
        t.join(timeout=30)
        if os.path.exists(sock):
            os.unlink(sock)


def create_volume(p: Plugin, size: int, *, source: pb.VolumeContentSource | None = None,
                  cap: pb.VolumeCapability | None = None, **params: str) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=unique(), capacity_range=pb.CapacityRange(required_bytes=size),
                                 volume_capabilities=[cap or mount_cap()], parameters=params)
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    deadline = time.monotonic() + 120
    while True:
        try:
            return p.controller.CreateVolume(req).volume
        except grpc.RpcError as e:  # ABORTED while the copy runs: the CO retries
            if e.code() is not Code.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def stage(p: Plugin, node: rpc.NodeStub, node_id: str, vid: str, path: Path,
          cap: pb.VolumeCapability) -> None:
    ctx = p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node_id, volume_capability=cap)).publish_context
    path.mkdir()
    node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(path),
                                                   volume_capability=cap, publish_context=ctx))


def unstage(p: Plugin, node: rpc.NodeStub, node_id: str, vid: str, path: Path) -> None:
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(path)))
    p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node_id))


def group_ready(p: Plugin, name: str, sources: list[str], timeout: float = 120) -> pb.VolumeGroupSnapshot:
    deadline = time.monotonic() + timeout
    while True:
        g = p.groups.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
            name=name, source_volume_ids=sources)).group_snapshot
        if g.ready_to_use or time.monotonic() > deadline:
            return g
        time.sleep(0.3)


def snap_source(sid: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=sid))


@pytest.fixture
def two_arrays(ext4_mount: Path, tmp_path: Path) -> Iterator[Plugin]:
    """Two file pools on ext4 (no reflink: every extent is a host copy), 256 MiB each."""
    tag = unique("g")
    with running_plugin(tmp_path / "plugin", [("pool-a", ext4_mount / f"a-{tag}", 256 * MiB, {}),
                                              ("pool-b", ext4_mount / f"b-{tag}", 256 * MiB, {})]) as p:
        yield p


@pytest.mark.root
def test_group_of_two_volumes_on_two_arrays_and_nodes_is_cut_at_one_instant(two_arrays: Plugin,
                                                                            tmp_path: Path) -> None:
    """A writer alternates A, B, A, B... (one global counter, fdatasync each): record n goes to A
    when n is even, to B when odd, and each waits for the one before.  In the restored images a
    record of B never appears without every earlier record of A, and the other way round."""
    p = two_arrays
    cap = mount_cap("ext4")
    a = create_volume(p, 64 * MiB, cap=cap, arrays="pool-a").volume_id
    b = create_volume(p, 64 * MiB, cap=cap, arrays="pool-b").volume_id
    with node_plugin(p, NODE_2) as node2:
        stage(p, p.node, NODE_ID, a, tmp_path / "a", cap)
        stage(p, node2, NODE_2, b, tmp_path / "b", cap)
        acked: list[tuple[int, float]] = []
        stop = threading.Event()
        failure: list[BaseException] = []

        def writer() -> None:
            fds = [os.open(tmp_path / d / "seq.bin", os.O_WRONLY | os.O_CREAT, 0o644) for d in ("a", "b")]
            try:
                n = 0
                while not stop.is_set():
                    fd = fds[n % 2]
                    os.pwrite(fd, _record(n), (n // 2) * BLOCK)
                    os.fdatasync(fd)
                    acked.append((n, time.time()))
                    n += 1
            except BaseException as e:
                failure.append(e)
            finally:
                for fd in fds:
                    os.close(fd)

        w = threading.Thread(target=writer)
        w.start()
        try:
            while len(acked) < 200:
                time.sleep(0.05)
            g = group_ready(p, unique("group"), [a, b])
            time.sleep(0.3)  # the writer carries on after the cut
        finally:
            stop.set()
            w.join()
        assert not failure, failure
        assert g.ready_to_use and len(g.snapshots) == 2
        with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
            pairs = {s.source_volume_id: st.get(S.PAIRS, s.snapshot_id) for s in g.snapshots}
            for rec in pairs.values():
                assert rec is not None and rec.value.fence.value == "released"
                assert {e.method.value for e in rec.value.targets[0].extents} == {"host"}
            assert pairs[a] is not None and pairs[b] is not None
            assert pairs[a].value.fence_node == NODE_ID and pairs[b].value.fence_node == NODE_2
        by_source = {s.source_volume_id: s.snapshot_id for s in g.snapshots}
        seen: dict[str, list[int]] = {}
        for vid in (a, b):
            restored = create_volume(p, 64 * MiB, source=snap_source(by_source[vid]), cap=cap).volume_id
            where = tmp_path / f"restored-{vid}"
            stage(p, p.node, NODE_ID, restored, where, cap)
            with open(where / "seq.bin", "rb") as f:
                seen[vid] = _records(f.read())
            unstage(p, p.node, NODE_ID, restored, where)
        unstage(p, p.node, NODE_ID, a, tmp_path / "a")
        unstage(p, node2, NODE_2, b, tmp_path / "b")
    in_a, in_b = seen[a], seen[b]
    assert in_a == list(range(0, 2 * len(in_a), 2)), "A's image is not a prefix of what A was given"
    assert in_b == list(range(1, 2 * len(in_b), 2)), "B's image is not a prefix of what B was given"
    max_a, max_b = (in_a[-1] if in_a else -1), (in_b[-1] if in_b else -1)
    assert max_a >= 100 and max_b >= 100, "the writer must have run before the cut"
    assert acked[-1][0] > max(max_a, max_b) + 2, "the writer must have run after the cut"
    # a record is written only after the one before it was acknowledged, on the other volume
    assert max_b <= max_a + 1, f"B holds record {max_b}, but A lacks record {max_b - 1} written before it"
    assert max_a <= max_b + 1, f"A holds record {max_a}, but B lacks record {max_a - 1} written before it"


def _frozen_write(path: Path, timeout: float = 10.0) -> bool:
    """Whether a write + fdatasync into `path` completes within `timeout` (False: writes are held)."""
    done = threading.Event()

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"still writable", 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return done.wait(timeout)


@pytest.mark.root
def test_a_member_whose_node_refuses_releases_all_others(two_arrays: Plugin, tmp_path: Path) -> None:
    """B is published to a node that has not staged it: that node refuses to cut it.  The group
    fails with FAILED_PRECONDITION, the other member (already held) is let go and its cut
    dropped, and nothing is left."""
    p = two_arrays
    cap = mount_cap("ext4")
    a = create_volume(p, 64 * MiB, cap=cap, arrays="pool-a").volume_id
    b = create_volume(p, 64 * MiB, cap=block_cap(), arrays="pool-b").volume_id
    stage(p, p.node, NODE_ID, a, tmp_path / "a", cap)
    p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=b, node_id=NODE_ID, volume_capability=block_cap()))
    before = p.footprint()
    with pytest.raises(grpc.RpcError) as e:
        p.groups.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
            name=unique("group"), source_volume_ids=[a, b]))
    assert e.value.code() is Code.FAILED_PRECONDITION, e.value.details()
    assert "not staged" in (e.value.details() or "")
    assert p.footprint() == before, "the failed group left a member behind"
    assert _frozen_write(tmp_path / "a" / "after.bin"), "volume A is still held after the group failed"
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        assert st.list(S.PAIRS) == [] and st.list(S.GROUPS) == []
        assert {r.value.state.value for r in st.list(S.LUNS)} == {"in-use"}
    deadline = time.monotonic() + 10
    while (left := [str(x) for x in (p.data_dir / "node").rglob("cuts/*")]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"the held member's cut was not dropped: {left}"
    unstage(p, p.node, NODE_ID, a, tmp_path / "a")
    p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=b, node_id=NODE_ID))


@pytest.fixture
def big_pools(tmp_path: Path) -> Iterator[Plugin]:
    """Two file pools on an ext4 of their own (no reflink: every extent a host copy), room for
    two 256 MiB volumes, their snapshots and a restore."""
    with loop_filesystem("ext4", tmp_path / "fs", size=4 << 30) as mnt:
        with running_plugin(tmp_path / "plugin", [("pool-a", mnt / "a", 0, {}), ("pool-b", mnt / "b", 0, {})]) as p:
            yield p


@pytest.mark.root
def test_group_of_two_volumes_in_use_holds_their_writes_only_for_an_instant(big_pools: Plugin,
                                                                            tmp_path: Path) -> None:
    """A mounted ext4 (on this node) and a raw block volume (on node 2), 256 MiB each, each with a
    writer that fdatasyncs records every few ms, and data enough that each member's host copy
    takes seconds.  The group is cut live: both writers stall less than STALL_MAX (the freeze it
    replaces held the ext4 writer for the whole copy, and refused the raw block member), and each
    image holds exactly the records its writer had acknowledged at the group's instant."""
    from test_live_cut import RECORD, STALL_MAX, Writer, _check_image, prefix_length

    p = big_pools
    size = 256 * MiB
    fs_cap, raw_cap = mount_cap("ext4"), block_cap()
    a = create_volume(p, size, cap=fs_cap, arrays="pool-a").volume_id
    b = create_volume(p, size, cap=raw_cap, arrays="pool-b").volume_id
    with node_plugin(p, NODE_2) as node2:
        stage(p, p.node, NODE_ID, a, tmp_path / "a", fs_cap)
        stage(p, node2, NODE_2, b, tmp_path / "b", raw_cap)
        dev = tmp_path / "b-dev"
        node2.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=b, staging_target_path=str(tmp_path / "b"), target_path=str(dev), volume_capability=raw_cap))
        try:
            fill = os.urandom(96 * MiB)   # data to copy (holes are skipped), slowed to seconds below
            (tmp_path / "a" / "fill.bin").write_bytes(fill)
            fd = os.open(dev, os.O_WRONLY)
            try:
                os.pwrite(fd, fill, 64 * MiB)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.sync()
            for v in (a, b):
                p.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
                    volume_id=v, mutable_parameters={"copyBandwidth": "32Mi"}))
            with Writer(tmp_path / "a" / "seq.bin", create=True) as wa, Writer(dev, create=False) as wb:
                while len(wa.acked) < 50 or len(wb.acked) < 50:
                    time.sleep(0.01)
                t0 = time.time()
                g = group_ready(p, unique("group"), [a, b])
                t1 = time.time()
                time.sleep(0.3)
            assert g.ready_to_use, "a raw block member in use is cut, not refused"
            assert t1 - t0 > 2, f"the copies took {t1 - t0:.1f}s: too short to show a hold for the copy"
            stalls = {"ext4": wa.longest_stall(t0, t1), "raw block": wb.longest_stall(t0, t1)}
            print(f"group snapshot in {t1 - t0:.2f}s; the writers' longest stalls: "
                  + ", ".join(f"{k} {v:.3f}s" for k, v in stalls.items()))
            for what, stall in stalls.items():
                assert stall < STALL_MAX, f"the {what} writer stalled {stall:.3f}s during the group snapshot"
            by_source = {s.source_volume_id: s.snapshot_id for s in g.snapshots}
            with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
                pairs = {v: st.get(S.PAIRS, by_source[v]) for v in (a, b)}
                snap_b = st.get(S.VOLUMES, by_source[b])
            cuts = {}
            for v, rec in pairs.items():
                assert rec is not None and rec.value.fence.value == "released"
                assert {e.method.value for e in rec.value.targets[0].extents} == {"host"}
                cuts[v] = rec.value.cut_at
            # B's image, read from its snapshot's LUNs
            assert snap_b is not None
            image = bytearray()
            for e in snap_b.value.extents:
                with open(p.pools[e.array] / "luns" / f"{e.lun}.img", "rb") as f:
                    f.seek(e.offset)
                    image += f.read(min(e.length, (len(wb.acked) + 64) * RECORD - len(image)))
            _check_image(bytes(image), wb.acked, cuts[b])
            assert prefix_length(bytes(image)) < len(wb.acked), "the image holds records written after the cut"
            # A's image, through a restored filesystem
            restored = create_volume(p, size, source=snap_source(by_source[a]), cap=fs_cap).volume_id
            where = tmp_path / "restored-a"
            stage(p, p.node, NODE_ID, restored, where, fs_cap)
            try:
                _check_image((where / "seq.bin").read_bytes(), wa.acked, cuts[a])
                assert (where / "fill.bin").read_bytes() == fill
            finally:
                unstage(p, p.node, NODE_ID, restored, where)
        finally:
            node2.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=b, target_path=str(dev)))
            unstage(p, node2, NODE_2, b, tmp_path / "b")
            unstage(p, p.node, NODE_ID, a, tmp_path / "a")


# -- failures and crashes at each step of a group's cut (a separate plugin process) ---------------

GROUP_POINTS = ["group-recorded", "group-members-recorded", "group-hold-requested", "group-held",
                "group-cut-1", "group-cut", "group-marked-cut"]


@pytest.mark.parametrize("point", [f"{p}=error" for p in GROUP_POINTS[:-1]] + GROUP_POINTS)
def test_group_fails_or_crashes_at_each_step_and_leaves_nothing_half_made(point: str, ext4_mount: Path,
                                                                          tmp_path: Path) -> None:
    """An error at a step is answered, and every member is undone at once; a SIGKILL at a
    step is followed by a restart that undoes a group never cut, or finishes one that was.
    Either way the sources are unfenced, the LUN files equal the LUN records, and the
    group can then be made and restores what the sources held."""
    import signal

    import yaml

    from test_crash import content, serving

    tag = uuid.uuid4().hex[:8]
    pools = {"pool-a": ext4_mount / f"ga-{tag}", "pool-b": ext4_mount / f"gb-{tag}"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"arrays": [
        {"id": a, "kind": "file", "params": {"path": str(p), "capacity": str(256 * MiB)}} for a, p in pools.items()]}))
    data = tmp_path / "data"
    data.mkdir()
    with serving(data, config) as (_, channel):
        vids = [rpc.ControllerStub(channel).CreateVolume(pb.CreateVolumeRequest(
            name=f"src-{a}", capacity_range=pb.CapacityRange(required_bytes=32 * MiB),
            volume_capabilities=[mount_cap()], parameters={"arrays": a})).volume.volume_id for a in pools]
    for a, pool in pools.items():
        for lun in pool.joinpath("luns").glob("*.img"):
            with open(lun, "r+b") as f:
                f.write(os.urandom(4 * MiB) + a.encode() * 1024)
    at_cut = {v: content(data, pools, v) for v in vids}

    def footprint() -> tuple[set[str], dict[str, int], set[str]]:
        with SqliteStore(str(data / "state.db"), readonly=True) as st:
            luns = {r.value.key for r in st.list(S.LUNS)}
            counts = {t.name: len(st.list(t)) for t in (S.VOLUMES, S.PAIRS, S.GROUPS)}
            states = {r.value.state.value for r in st.list(S.LUNS)}
        files = {f"{a}:{f.stem}" for a, p in pools.items() for f in p.joinpath("luns").glob("*.img")}
        assert files == luns, "LUN files and LUN records disagree (a leak or a loss)"
        return luns, counts, states

    before = footprint()
    req = pb.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=vids)
    with serving(data, config, failpoint=point) as (proc, channel):
        groups = rpc.GroupControllerStub(channel)
        if point.endswith("=error"):
            with pytest.raises(grpc.RpcError) as e:
                groups.CreateVolumeGroupSnapshot(req, timeout=60)
            assert e.value.code() is Code.INTERNAL and "injected" in (e.value.details() or "")
            assert footprint() == before, f"an error at {point} left part of the group behind"
        else:
            with pytest.raises(grpc.RpcError):
                groups.CreateVolumeGroupSnapshot(req, timeout=60)  # the plugin dies under the call
            proc.wait(timeout=60)
            assert proc.returncode == -signal.SIGKILL, f"failpoint {point} was not reached"

    with serving(data, config) as (_, channel):
        ctl, groups = rpc.ControllerStub(channel), rpc.GroupControllerStub(channel)
        if not point.endswith("=error") and point != "group-marked-cut":
            assert footprint() == before, f"the restart after a crash at {point} did not undo the group"
        deadline = time.monotonic() + 120
        while True:
            g = groups.CreateVolumeGroupSnapshot(req).group_snapshot
            if g.ready_to_use:
                break
            assert time.monotonic() < deadline, "the group never became ready"
            time.sleep(0.5)
        assert sorted(s.source_volume_id for s in g.snapshots) == sorted(vids)
        for s in g.snapshots:
            assert content(data, pools, s.snapshot_id) == at_cut[s.source_volume_id]
        assert footprint()[2] == {"in-use"}, "a source stayed fenced"
        groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in g.snapshots]))
        assert footprint() == before
        for v in vids:
            ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v))
    assert [f for p in pools.values() for f in p.joinpath("luns").glob("*")] == []


@pytest.mark.root
def test_no_member_is_cut_alone_while_its_group_is_cutting(ext4_mount: Path, tmp_path: Path) -> None:
    """The snapshot service's reconcile (resume) keeps every copy in flight running; it must not
    cut and copy a member of a group still being cut, or that member would be let go early."""
    import dataclasses

    import yaml

    from csi_virtvol.model.capability import AccessMode, AccessType, Capability
    from csi_virtvol.model.group import GroupSnapshot, GroupState
    from csi_virtvol.model.ids import VolumeId
    from csi_virtvol.model.volume import VolumeKind
    from csi_virtvol.services.groups import cut_group, group_id_for, member_name
    from csi_virtvol.services.locks import KeyedLocks
    from csi_virtvol.services.volumes import CreateVolume, volume_id_for

    tag = unique("r")
    pools = {"pool-a": ext4_mount / f"ra-{tag}", "pool-b": ext4_mount / f"rb-{tag}"}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"arrays": [
        {"id": a, "kind": "file", "params": {"path": str(p), "capacity": str(64 * MiB)}} for a, p in pools.items()]}))
    config = load_config(endpoint=f"unix://{tmp_path}/unused.sock", data_dir=str(tmp_path / "data"),
                         node_id=NODE_ID, config_file=str(cfg))
    os.makedirs(config.data_dir)
    store = SqliteStore(config.state_path)
    core = app.build_controller(config, store, KeyedLocks())
    try:
        cap = Capability(access_type=AccessType.MOUNT, access_mode=AccessMode.SINGLE_NODE_WRITER)
        vols = [core.volumes.create(CreateVolume(name=f"v-{a}", required_bytes=8 * MiB, parameters={"arrays": a},
                                                 capabilities=(cap,))) for a in pools]
        members = tuple(volume_id_for(member_name("g", v.id), VolumeKind.SNAPSHOT) for v in vols)
        group = GroupSnapshot(id=group_id_for("g"), name="g", sources=tuple(VolumeId(v.id) for v in vols),
                              members=members, state=GroupState.CUTTING, created_at=time.time())
        store.create(S.GROUPS, group)
        for v, m in zip(vols, members):
            core.snapshots.record_member(snapshot_id=m, name=member_name("g", v.id), source=v, parameters={})
        core.snapshots.resume()  # what the reconcile loop runs every few seconds
        time.sleep(1.5)
        for m in members:
            pair = store.get(S.PAIRS, m)
            assert pair is not None and pair.value.cut_at == 0.0, f"member {m} was cut on its own"
            assert pair.value.fence.value == "none" and pair.value.state.value == "copying"
        assert {r.value.state.value for r in store.list(S.LUNS)} == {"in-use"}
        # the group then cuts them together, and they complete
        cut_group(store, core.snapshots, members)
        S.upsert(store, S.GROUPS, dataclasses.replace(group, state=GroupState.CUT, cut_at=time.time()))
        core.snapshots.resume()
        deadline = time.monotonic() + 60
        while not all(core.snapshots.get(m).state.value == "available" for m in members):
            assert time.monotonic() < deadline, "the members never completed"
            time.sleep(0.2)
        core.groups.delete(group.id, snapshot_ids=members)
        for v in vols:
            core.volumes.delete(v.id)
        assert [f for p in pools.values() for f in p.joinpath("luns").glob("*")] == []
    finally:
        core.snapshots.close()
        store.close()
