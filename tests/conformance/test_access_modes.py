"""Access modes, from the CSI v1.12 spec text, through the real plugin over gRPC.

NodePublishVolume: the spec's second table (the plugin advertises SINGLE_NODE_MULTI_WRITER),
for a second publish of a volume on the same node (T: target path, P: the other arguments):

    |                            | T1=T2, P1=P2 | T1=T2, P1!=P2  | T1!=T2, P1=P2       | T1!=T2, P1!=P2      |
    | SINGLE_NODE_SINGLE_WRITER  | OK           | ALREADY_EXISTS | FAILED_PRECONDITION | FAILED_PRECONDITION |
    | SINGLE_NODE_MULTI_WRITER   | OK           | ALREADY_EXISTS | OK                  | OK                  |
    | MULTI_NODE_...             | OK           | ALREADY_EXISTS | OK                  | OK                  |
    | Non MULTI_NODE_...         | OK           | ALREADY_EXISTS | FAILED_PRECONDITION | FAILED_PRECONDITION |

and "a second time with a different volume_capability: FAILED_PRECONDITION".

ControllerPublishVolume: published to the node but incompatible (capability or readonly):
ALREADY_EXISTS; published to another node without a MULTI_NODE capability: FAILED_PRECONDITION
naming that node; max volumes attached: RESOURCE_EXHAUSTED.

The reader-only modes publish read-only whatever the request's readonly flag (a CO may leave
it false for a ReadOnlyMany volume); MULTI_NODE_SINGLE_WRITER and MULTI_NODE_MULTI_WRITER are
not served (CreateVolume refuses them too): INVALID_ARGUMENT everywhere.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.model.ids import NodeId
from csi_virtvol.model.node import NodeInfo
from csi_virtvol.node import capacity, composer
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import NODE_ID, Plugin, block_cap, mount_cap, running_plugin, unique

MiB = 1 << 20
Code = grpc.StatusCode
M = pb.VolumeCapability.AccessMode.Mode
OK = Code.OK
AE, FP, IA = Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT
OTHER_NODE = "node-b"

pytestmark = pytest.mark.root

# mode -> (T1=T2,P1=P2  T1=T2,P1!=P2  T1!=T2,P1=P2  T1!=T2,P1!=P2), the spec's second table
NODE_TABLE = {
    M.SINGLE_NODE_SINGLE_WRITER: (OK, AE, FP, FP),
    M.SINGLE_NODE_MULTI_WRITER: (OK, AE, OK, OK),
    M.MULTI_NODE_READER_ONLY: (OK, AE, OK, OK),
    M.SINGLE_NODE_WRITER: (OK, AE, FP, FP),       # non MULTI_NODE
    M.SINGLE_NODE_READER_ONLY: (OK, AE, FP, FP),  # non MULTI_NODE
}
UNSERVED = (M.MULTI_NODE_SINGLE_WRITER, M.MULTI_NODE_MULTI_WRITER, M.UNKNOWN)


def outcome(call: Callable[[Any], Any], req: Any) -> grpc.StatusCode:
    try:
        call(req)
    except grpc.RpcError as e:
        assert e.details(), "an error must say why"
        return e.code()  # type: ignore[no-any-return]
    return OK


def new_volume(p: Plugin, cap: pb.VolumeCapability) -> str:
    return str(p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=8 * MiB),
        volume_capabilities=[cap])).volume.volume_id)


def cpub(vid: str, cap: pb.VolumeCapability, *, node: str = NODE_ID,
         readonly: bool = False) -> pb.ControllerPublishVolumeRequest:
    return pb.ControllerPublishVolumeRequest(volume_id=vid, node_id=node, volume_capability=cap,
                                             readonly=readonly)


def npub(vid: str, cap: pb.VolumeCapability, staging: Path, target: Path, *,
         readonly: bool = False) -> pb.NodePublishVolumeRequest:
    return pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                       target_path=str(target), volume_capability=cap, readonly=readonly)


def staged(p: Plugin, tmp: Path, cap: pb.VolumeCapability, *, readonly: bool = False) -> tuple[str, Path]:
    """A new volume, ControllerPublished to this node and staged."""
    vid = new_volume(p, cap)
    ctx = p.controller.ControllerPublishVolume(cpub(vid, cap, readonly=readonly)).publish_context
    staging = tmp / f"staging-{vid}"
    staging.mkdir()
    p.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
    return vid, staging


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def writable(target: Path) -> bool:
    """Whether a write through the published target reaches the volume."""
    try:
        if target.is_dir():
            (target / "probe").write_bytes(b"x")
            (target / "probe").unlink()
        else:
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, b"virtvol", 0)
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        assert e.errno in (errno.EROFS, errno.EACCES, errno.EPERM), e
        return False
    return True


def register(p: Plugin, node: str, *, max_volumes: int = 0) -> None:
    """A second node, as its node plugin would announce itself (NodeGetInfo's record)."""
    with SqliteStore(str(p.data_dir / "state.db")) as st:
        S.upsert(st, S.NODES, NodeInfo(id=NodeId(node), max_volumes=max_volumes))


def published_nodes(p: Plugin, vid: str) -> list[str]:
    got = p.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid))
    return sorted(got.status.published_node_ids)


def teardown(p: Plugin, vid: str, staging: Path, *targets: Path) -> None:
    for t in targets:
        p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(t)))
        assert not mounted(t) and not t.exists()
    p.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid))
    p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


# -- NodePublishVolume: the spec's table, mode by mode ---------------------------------------

@pytest.mark.parametrize("mode", sorted(NODE_TABLE), ids=lambda m: M.Name(m))
def test_node_publish_follows_the_spec_table(plugin: Plugin, tmp_path: Path, mode: int) -> None:
    same, same_target_other_args, other_target, other_target_other_args = NODE_TABLE[mode]
    cap = block_cap(mode)
    vid, staging = staged(plugin, tmp_path, cap)
    n = plugin.node
    t1, t2, t3 = tmp_path / "t1", tmp_path / "t2", tmp_path / "t3"
    assert outcome(n.NodePublishVolume, npub(vid, cap, staging, t1)) is OK
    assert mounted(t1)

    assert outcome(n.NodePublishVolume, npub(vid, cap, staging, t1)) is same
    assert outcome(n.NodePublishVolume, npub(vid, cap, staging, t1, readonly=True)) is same_target_other_args
    assert mounted(t1)

    got = outcome(n.NodePublishVolume, npub(vid, cap, staging, t2))
    assert got is other_target
    assert mounted(t2) is (got is OK) and t2.exists() is (got is OK), "a refused publish left its target behind"
    got = outcome(n.NodePublishVolume, npub(vid, cap, staging, t3, readonly=True))
    assert got is other_target_other_args
    assert mounted(t3) is (got is OK) and t3.exists() is (got is OK)
    if got is OK:
        assert not writable(t3)  # the readonly flag of that publish holds at its target

    # "a second time with a different volume_capability": FAILED_PRECONDITION whatever the mode
    other = M.SINGLE_NODE_MULTI_WRITER if mode != M.SINGLE_NODE_MULTI_WRITER else M.MULTI_NODE_READER_ONLY
    t4 = tmp_path / "t4"
    assert outcome(n.NodePublishVolume, npub(vid, block_cap(other), staging, t4)) is FP
    assert not t4.exists()

    # reader-only modes are read-only even when the request's flag says false
    reader = cap.access_mode.mode in (M.SINGLE_NODE_READER_ONLY, M.MULTI_NODE_READER_ONLY)
    assert writable(t1) is not reader
    teardown(plugin, vid, staging, *(t for t in (t1, t2, t3) if t.exists()))

    # once the first target is gone, another one is fine for every mode
    vid, staging = staged(plugin, tmp_path, cap)
    n.NodePublishVolume(npub(vid, cap, staging, t1))
    n.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(t1)))
    assert outcome(n.NodePublishVolume, npub(vid, cap, staging, t2)) is OK
    teardown(plugin, vid, staging, t2)


def test_mount_reader_only_volume_is_read_only_whatever_the_flag(plugin: Plugin, tmp_path: Path) -> None:
    """A ReadOnlyMany (MULTI_NODE_READER_ONLY) mount publish with readonly=false, as Kubernetes
    sends it for a pod that does not set readOnly, gets a read-only filesystem."""
    writer = mount_cap("ext4")
    vid, staging = staged(plugin, tmp_path, writer)
    t = tmp_path / "w"
    plugin.node.NodePublishVolume(npub(vid, writer, staging, t))
    (t / "data").write_bytes(b"made by the writer")
    plugin.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(t)))
    plugin.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    plugin.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid))

    reader = mount_cap("ext4", mode=M.MULTI_NODE_READER_ONLY)
    ctx = plugin.controller.ControllerPublishVolume(cpub(vid, reader)).publish_context
    plugin.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=reader, publish_context=ctx))
    a, b = tmp_path / "a", tmp_path / "b"
    plugin.node.NodePublishVolume(npub(vid, reader, staging, a))
    plugin.node.NodePublishVolume(npub(vid, reader, staging, b, readonly=True))  # MULTI_NODE: a second target
    for t in (a, b):
        assert (t / "data").read_bytes() == b"made by the writer"
        assert not writable(t)
    teardown(plugin, vid, staging, a, b)


def test_controller_readonly_attachment_publishes_read_only(plugin: Plugin, tmp_path: Path) -> None:
    """ControllerPublishVolume readonly=true (PUBLISH_READONLY) binds the node too: a
    NodePublishVolume of that volume with readonly=false still cannot write."""
    cap = block_cap(M.SINGLE_NODE_WRITER)
    vid, staging = staged(plugin, tmp_path, cap, readonly=True)
    t = tmp_path / "t"
    plugin.node.NodePublishVolume(npub(vid, cap, staging, t))
    assert not writable(t)
    teardown(plugin, vid, staging, t)


# -- ControllerPublishVolume --------------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(NODE_TABLE), ids=lambda m: M.Name(m))
def test_controller_publish_per_mode(plugin: Plugin, mode: int) -> None:
    register(plugin, OTHER_NODE)
    cap = block_cap(mode)
    vid = new_volume(plugin, cap)
    c = plugin.controller.ControllerPublishVolume
    first = c(cpub(vid, cap)).publish_context
    assert c(cpub(vid, cap)).publish_context == first  # idempotent
    before = plugin.footprint()
    assert outcome(c, cpub(vid, cap, readonly=True)) is AE
    other = M.SINGLE_NODE_MULTI_WRITER if mode != M.SINGLE_NODE_MULTI_WRITER else M.SINGLE_NODE_WRITER
    assert outcome(c, cpub(vid, block_cap(other))) is AE
    assert outcome(c, cpub(vid, mount_cap(mode=mode))) is AE  # another access type
    want = OK if mode == M.MULTI_NODE_READER_ONLY else FP
    try:
        c(cpub(vid, cap, node=OTHER_NODE))
        got = OK
    except grpc.RpcError as e:
        got = e.code()
        assert NODE_ID in e.details(), "the spec: SHOULD name the node the volume is published to"
    assert got is want
    assert published_nodes(plugin, vid) == sorted([NODE_ID] + ([OTHER_NODE] if got is OK else []))
    if got is not OK:
        assert plugin.footprint() == before
    plugin.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid))
    # unpublished everywhere, it may go to the other node
    c(cpub(vid, cap, node=OTHER_NODE))
    assert published_nodes(plugin, vid) == [OTHER_NODE]


def test_reader_nodes_and_a_writer_node_exclude_each_other(plugin: Plugin) -> None:
    register(plugin, OTHER_NODE)
    c = plugin.controller.ControllerPublishVolume
    ro, rw = block_cap(M.MULTI_NODE_READER_ONLY), block_cap(M.SINGLE_NODE_WRITER)
    vid = new_volume(plugin, ro)
    c(cpub(vid, rw))  # a writer here: no reader elsewhere
    assert outcome(c, cpub(vid, ro, node=OTHER_NODE)) is FP
    plugin.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID))
    c(cpub(vid, ro))  # readers here: no writer elsewhere, more readers fine
    assert outcome(c, cpub(vid, rw, node=OTHER_NODE)) is FP
    assert outcome(c, cpub(vid, ro, node=OTHER_NODE, readonly=True)) is OK
    assert published_nodes(plugin, vid) == sorted([NODE_ID, OTHER_NODE])


@pytest.mark.parametrize("mode", UNSERVED, ids=lambda m: M.Name(m))
def test_unserved_modes_are_invalid_everywhere(plugin: Plugin, tmp_path: Path, mode: int) -> None:
    """MULTI_NODE_SINGLE_WRITER / MULTI_NODE_MULTI_WRITER: CreateVolume refuses them, and so
    does every publish of a volume created with a served mode."""
    before = plugin.footprint()
    for cap in (block_cap(mode), mount_cap(mode=mode)):
        assert outcome(plugin.controller.CreateVolume, pb.CreateVolumeRequest(
            name=unique(), capacity_range=pb.CapacityRange(required_bytes=8 * MiB),
            volume_capabilities=[cap])) is IA
    assert plugin.footprint() == before
    ok = block_cap(M.SINGLE_NODE_WRITER)
    vid, staging = staged(plugin, tmp_path, ok)
    before = plugin.footprint()
    bad = block_cap(mode)
    assert outcome(plugin.controller.ControllerPublishVolume, cpub(vid, bad)) is IA
    assert outcome(plugin.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=bad)) is IA
    t = tmp_path / "t"
    assert outcome(plugin.node.NodePublishVolume, npub(vid, bad, staging, t)) is IA
    assert not t.exists() and plugin.footprint() == before
    confirmed = plugin.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vid, volume_capabilities=[bad]))
    assert not confirmed.HasField("confirmed") and confirmed.message
    teardown(plugin, vid, staging)


def test_single_node_multi_writer_modes_are_advertised_and_served(plugin: Plugin) -> None:
    """The new single-node modes are the plugin's to serve only because it advertises
    SINGLE_NODE_MULTI_WRITER in both services; CreateVolume accepts them."""
    ccaps = {c.rpc.type for c in plugin.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities}
    ncaps = {c.rpc.type for c in plugin.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
    assert pb.ControllerServiceCapability.RPC.SINGLE_NODE_MULTI_WRITER in ccaps
    assert pb.NodeServiceCapability.RPC.SINGLE_NODE_MULTI_WRITER in ncaps
    for mode in (M.SINGLE_NODE_SINGLE_WRITER, M.SINGLE_NODE_MULTI_WRITER, M.SINGLE_NODE_WRITER):
        new_volume(plugin, mount_cap(mode=mode))


# -- state that outlives the plugin ---------------------------------------------------------------

@pytest.fixture
def pools(xfs_mount: Path, ext4_mount: Path) -> Iterator[list[tuple[str, Path, int, dict[str, str]]]]:
    tag = uuid.uuid4().hex[:8]
    fast, slow = xfs_mount / f"fast-{tag}", ext4_mount / f"slow-{tag}"
    yield [("fast", fast, 256 * MiB, {}), ("slow", slow, 256 * MiB, {})]
    shutil.rmtree(fast, ignore_errors=True)
    shutil.rmtree(slow, ignore_errors=True)


def test_access_mode_rules_survive_a_plugin_restart(
        tmp_path: Path, pools: list[tuple[str, Path, int, dict[str, str]]]) -> None:
    cap = block_cap(M.SINGLE_NODE_SINGLE_WRITER)
    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    with running_plugin(tmp_path, pools, teardown_node=False) as p:
        register(p, OTHER_NODE)
        vid, staging = staged(p, tmp_path, cap)
        p.node.NodePublishVolume(npub(vid, cap, staging, t1))
    assert mounted(t1)  # the plugin stopped; the workload's mount stays
    with running_plugin(tmp_path, pools) as p:
        assert outcome(p.node.NodePublishVolume, npub(vid, cap, staging, t2)) is FP
        assert not t2.exists()
        assert outcome(p.node.NodePublishVolume, npub(vid, cap, staging, t1, readonly=True)) is AE
        assert outcome(p.node.NodePublishVolume, npub(vid, cap, staging, t1)) is OK
        assert outcome(p.controller.ControllerPublishVolume, cpub(vid, cap, node=OTHER_NODE)) is FP
        assert outcome(p.controller.ControllerPublishVolume, cpub(vid, cap, readonly=True)) is AE
        teardown(p, vid, staging, t1)


# -- max_volumes_per_node -------------------------------------------------------------------------

def test_node_reports_what_it_can_hold_by_default(plugin: Plugin) -> None:
    got = plugin.node.NodeGetInfo(pb.NodeGetInfoRequest()).max_volumes_per_node
    expected, _ = capacity.max_volumes(composer=composer.resolve_kind("auto"), nbd=False)
    assert got == expected > 0
    with SqliteStore(str(plugin.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.NODES, NODE_ID)
    assert rec is not None and rec.value.max_volumes == got  # what ControllerPublish enforces


def test_max_volumes_per_node_setting_wins_and_is_enforced(
        tmp_path: Path, pools: list[tuple[str, Path, int, dict[str, str]]]) -> None:
    with running_plugin(tmp_path, pools, settings={"maxVolumesPerNode": 2}) as p:
        assert p.node.NodeGetInfo(pb.NodeGetInfoRequest()).max_volumes_per_node == 2
        cap = block_cap(M.SINGLE_NODE_WRITER)
        a, b, c = (new_volume(p, cap) for _ in range(3))
        pub = p.controller.ControllerPublishVolume
        pub(cpub(a, cap))
        pub(cpub(b, cap))
        before = p.footprint()
        assert outcome(pub, cpub(c, cap)) is Code.RESOURCE_EXHAUSTED
        assert published_nodes(p, c) == [] and p.footprint() == before
        pub(cpub(a, cap))  # publishing again what the node holds is not one more
        p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=a, node_id=NODE_ID))
        pub(cpub(c, cap))
        assert published_nodes(p, c) == [NODE_ID]


def test_max_volumes_per_node_must_not_be_negative(
        tmp_path: Path, pools: list[tuple[str, Path, int, dict[str, str]]]) -> None:
    from csi_virtvol import errors

    with pytest.raises(errors.InvalidRequest, match="maxVolumesPerNode"):
        with running_plugin(tmp_path, pools, settings={"maxVolumesPerNode": -1}):
            pass
