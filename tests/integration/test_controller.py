"""The controller over real gRPC on a unix socket, against file pools on XFS and ext4."""
from __future__ import annotations

import grpc
import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from harness.plugin import NODE_ID, Plugin, block_cap, mount_cap, unique

MiB = 1 << 20
Code = grpc.StatusCode


def create(p: Plugin, name: str, size: int, **params: str) -> pb.Volume:
    return p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap()], parameters=params)).volume


def code_of(call: object, request: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(request)  # type: ignore[operator]
    return e.value.code()


def test_single_array_volume_lands_on_first_eligible_array(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 64 * MiB)
    assert vol.capacity_bytes == 64 * MiB
    assert vol.volume_context["virtvol.csi.example.org/extents"] == "1"
    assert plugin.lun_files() == [f"fast/{vol.volume_id}-0.img"]
    assert vol.accessible_topology[0].segments["topology.virtvol.csi.example.org/node"] == NODE_ID


def test_volume_larger_than_any_array_is_concatenated_across_two(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 384 * MiB)  # each pool holds 256 MiB
    assert vol.volume_context["virtvol.csi.example.org/extents"] == "2"
    files = plugin.lun_files()
    assert len(files) == 2 and {f.split("/")[0] for f in files} == {"fast", "slow"}


def test_max_extent_size_bounds_extents(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 100 * MiB, layout="concat", maxExtentSize="32Mi")
    assert vol.volume_context["virtvol.csi.example.org/extents"] == "4"


def test_layout_single_refuses_what_one_array_cannot_hold(plugin: Plugin) -> None:
    before = plugin.footprint()
    req = pb.CreateVolumeRequest(name=unique(), capacity_range=pb.CapacityRange(required_bytes=384 * MiB),
                                 volume_capabilities=[mount_cap()], parameters={"layout": "single"})
    assert code_of(plugin.controller.CreateVolume, req) is Code.RESOURCE_EXHAUSTED
    assert plugin.footprint() == before


def test_arrays_and_selector_parameters_choose_the_array(plugin: Plugin) -> None:
    a = create(plugin, unique(), 8 * MiB, arrays="slow")
    b = create(plugin, unique(), 8 * MiB, arraySelector="tier=slow")
    files = plugin.lun_files()
    assert f"slow/{a.volume_id}-0.img" in files and f"slow/{b.volume_id}-0.img" in files


def test_create_is_idempotent_and_detects_a_different_request(plugin: Plugin) -> None:
    name = unique()
    a = create(plugin, name, 16 * MiB)
    b = create(plugin, name, 16 * MiB)
    assert a == b
    assert len(plugin.lun_files()) == 1
    assert code_of(plugin.controller.CreateVolume, pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=32 * MiB),
        volume_capabilities=[mount_cap()])) is Code.ALREADY_EXISTS
    assert code_of(plugin.controller.CreateVolume, pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_cap()], parameters={"arrays": "slow"})) is Code.ALREADY_EXISTS


def test_capacity_range_is_honoured(plugin: Plugin) -> None:
    v = plugin.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=MiB + 1, limit_bytes=4 * MiB),
        volume_capabilities=[mount_cap()])).volume
    assert v.capacity_bytes == 2 * MiB
    v = plugin.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(limit_bytes=3 * MiB),
        volume_capabilities=[mount_cap()])).volume
    assert MiB <= v.capacity_bytes <= 3 * MiB


def test_delete_frees_every_lun_and_deleting_again_succeeds(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 300 * MiB)
    assert len(plugin.lun_files()) == 2
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert plugin.lun_files() == []
    assert plugin.records() == {"volumes": 0, "luns": 0, "pairs": 0, "groups": 0}
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_discovered_intact_lun_is_reused_then_wiped_not_deleted(plugin: Plugin, tmp_path: object) -> None:
    # an administrator's LUN: present on the array before the driver knew of it
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="vv-none"))
    luns = plugin.pools["slow"] / "luns"
    luns.mkdir(parents=True, exist_ok=True)
    with open(luns / "admin-lun.img", "wb") as f:
        f.write(b"old tenant data" * 1000)
        f.truncate(16 * MiB)
    # the array is re-synchronised at start-up; restart by a new plugin on the same dirs
    from harness.plugin import running_plugin
    with running_plugin(plugin.data_dir.parent / "second", [
            ("fast", plugin.pools["fast"], 256 * MiB, {}), ("slow", plugin.pools["slow"], 256 * MiB, {})]) as p2:
        from csi_virtvol.store import base as S
        from csi_virtvol.store.sqlite import SqliteStore
        with SqliteStore(str(p2.data_dir / "state.db"), readonly=True) as st:
            arr = st.get(S.ARRAYS, "slow")
            assert arr is not None  # the physical volume table: the array's inventory at the sync
            assert [(x.id, x.state.value, x.origin.value) for x in arr.value.luns] == \
                [("admin-lun", "intact", "discovered")]
        vol = create(p2, unique(), 16 * MiB, arrays="slow")
        assert "slow/admin-lun.img" in p2.lun_files()
        assert not any(vol.volume_id in f for f in p2.lun_files())
        p2.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert "slow/admin-lun.img" in p2.lun_files()  # returned to intact, not deleted
        with open(luns / "admin-lun.img", "rb") as f:
            assert f.read(15000).count(b"\0") == 15000  # wiped before it went back


def test_publish_records_attachment_and_gives_extents(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 300 * MiB)
    ctx = plugin.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=NODE_ID, volume_capability=mount_cap())).publish_context
    import json
    extents = json.loads(ctx["virtvol.csi.example.org/extents"])
    assert [e[2] for e in extents] == [256 * MiB, 44 * MiB]
    got = plugin.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert list(got.status.published_node_ids) == [NODE_ID]
    assert not got.status.volume_condition.abnormal
    # same again: fine; readonly differs: ALREADY_EXISTS
    plugin.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=NODE_ID, volume_capability=mount_cap()))
    assert code_of(plugin.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=NODE_ID, volume_capability=mount_cap(), readonly=True)) is Code.ALREADY_EXISTS
    # published volumes are not deleted under the node
    assert code_of(plugin.controller.DeleteVolume,
                   pb.DeleteVolumeRequest(volume_id=vol.volume_id)) is Code.FAILED_PRECONDITION
    plugin.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id=NODE_ID))
    plugin.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id=NODE_ID))
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_publish_to_unknown_node_or_volume_is_not_found(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 8 * MiB)
    assert code_of(plugin.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id="no-such-node", volume_capability=mount_cap())) is Code.NOT_FOUND
    assert code_of(plugin.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id="vv-nope", node_id=NODE_ID, volume_capability=mount_cap())) is Code.NOT_FOUND


def test_expand_grows_last_lun_in_place_when_it_can(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 32 * MiB)
    r = plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=64 * MiB)))
    assert r.capacity_bytes == 64 * MiB and r.node_expansion_required
    assert plugin.lun_files() == [f"fast/{vol.volume_id}-0.img"]
    assert (plugin.pools["fast"] / "luns" / f"{vol.volume_id}-0.img").stat().st_size == 64 * MiB


def test_expand_appends_an_extent_when_the_array_is_full(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 200 * MiB)
    plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=300 * MiB)))
    got = plugin.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)).volume
    assert got.capacity_bytes == 300 * MiB
    assert got.volume_context["virtvol.csi.example.org/extents"] == "2"
    # the last LUN grew by what its array had left (56 MiB); the rest went to the next array
    assert sorted(plugin.lun_files()) == sorted([f"fast/{vol.volume_id}-0.img", f"slow/{vol.volume_id}-1.img"])
    assert (plugin.pools["fast"] / "luns" / f"{vol.volume_id}-0.img").stat().st_size == 256 * MiB


def test_list_volumes_paginates_stably(plugin: Plugin) -> None:
    ids = sorted(create(plugin, unique(), MiB).volume_id for _ in range(7))
    seen: list[str] = []
    token = ""
    while True:
        r = plugin.controller.ListVolumes(pb.ListVolumesRequest(max_entries=3, starting_token=token))
        assert len(r.entries) <= 3
        seen += [e.volume.volume_id for e in r.entries]
        if seen and token == "":
            # delete an already-listed volume between pages: later pages are unaffected
            plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=seen[0]))
        token = r.next_token
        if not token:
            break
    assert seen == ids
    assert code_of(plugin.controller.ListVolumes,
                   pb.ListVolumesRequest(starting_token="garbage")) is Code.ABORTED


def test_get_capacity_reflects_parameters(plugin: Plugin) -> None:
    all_ = plugin.controller.GetCapacity(pb.GetCapacityRequest())
    slow = plugin.controller.GetCapacity(pb.GetCapacityRequest(parameters={"arrays": "slow"}))
    assert all_.available_capacity == 2 * slow.available_capacity == 512 * MiB
    single = plugin.controller.GetCapacity(pb.GetCapacityRequest(parameters={"layout": "single"}))
    assert single.maximum_volume_size.value == 256 * MiB
    elsewhere = plugin.controller.GetCapacity(pb.GetCapacityRequest(accessible_topology=pb.Topology(
        segments={"topology.virtvol.csi.example.org/node": "other-node"})))
    assert elsewhere.available_capacity == 0


def test_modify_volume_accepts_declared_keys_only(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 8 * MiB)
    plugin.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"maxExtentSize": "64Mi"}))
    assert code_of(plugin.controller.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"iops": "9000"})) is Code.INVALID_ARGUMENT
    assert code_of(plugin.controller.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
        volume_id="vv-missing", mutable_parameters={"maxExtentSize": "64Mi"})) is Code.NOT_FOUND


def test_condition_turns_abnormal_when_a_lun_vanishes(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 8 * MiB)
    (plugin.pools["fast"] / "luns" / f"{vol.volume_id}-0.img").unlink()
    got = plugin.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.status.volume_condition.abnormal
    assert "missing" in got.status.volume_condition.message


def test_block_and_mount_capabilities_validated(plugin: Plugin) -> None:
    vol = create(plugin, unique(), 8 * MiB)
    ok = plugin.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[block_cap(), mount_cap("xfs")]))
    assert len(ok.confirmed.volume_capabilities) == 2
    bad = plugin.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap("ntfs")]))
    assert not bad.HasField("confirmed") and "ntfs" in bad.message
