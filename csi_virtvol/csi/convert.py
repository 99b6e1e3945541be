"""Proto <-> model conversions and the field checks every RPC shares."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from csi_virtvol import errors
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.model.capability import AccessMode, AccessType, Capability
from csi_virtvol.model.volume import VirtualVolume


def require(value: str, field: str) -> str:
    if not value:
        raise errors.InvalidRequest(f"{field} is required")
    return value


def capability(cap: pb.VolumeCapability, *, field: str = "volume_capability") -> Capability:
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise errors.InvalidRequest(f"{field}.access_type (block or mount) is required")
    if not cap.HasField("access_mode"):
        raise errors.InvalidRequest(f"{field}.access_mode is required")
    mode = AccessMode(cap.access_mode.mode) if cap.access_mode.mode in AccessMode._value2member_map_ else AccessMode.UNKNOWN
    if kind == "block":
        return Capability(access_type=AccessType.BLOCK, access_mode=mode)
    return Capability(access_type=AccessType.MOUNT, access_mode=mode, fs_type=cap.mount.fs_type,
                      mount_flags=tuple(cap.mount.mount_flags), mount_group=cap.mount.volume_mount_group)


def capabilities(caps: Iterable[pb.VolumeCapability]) -> tuple[Capability, ...]:
    out = tuple(capability(c, field="volume_capabilities") for c in caps)
    if not out:
        raise errors.InvalidRequest("volume_capabilities are required")
    return out


def topology(req: pb.TopologyRequirement) -> tuple[tuple[Mapping[str, str], ...], tuple[Mapping[str, str], ...]]:
    return (tuple(dict(t.segments) for t in req.requisite), tuple(dict(t.segments) for t in req.preferred))


def content_source(src: pb.VolumeContentSource) -> str:
    kind = src.WhichOneof("type")
    if kind == "snapshot":
        return "snapshot:" + require(src.snapshot.snapshot_id, "volume_content_source.snapshot.snapshot_id")
    if kind == "volume":
        return "volume:" + require(src.volume.volume_id, "volume_content_source.volume.volume_id")
    return ""


def content_source_pb(source: str) -> pb.VolumeContentSource | None:
    kind, _, ident = source.partition(":")
    if kind == "snapshot":
        return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=ident))
    if kind == "volume":
        return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=ident))
    return None


def volume(vol: VirtualVolume) -> pb.Volume:
    out = pb.Volume(
        volume_id=vol.id, capacity_bytes=vol.size,
        volume_context={"virtvol.csi.example.org/address": vol.address,
                        "virtvol.csi.example.org/extents": str(len(vol.extents))},
        accessible_topology=[pb.Topology(segments=dict(vol.topology))] if vol.topology else [],
    )
    src = content_source_pb(vol.content_source)
    if src is not None:
        out.content_source.CopyFrom(src)
    return out
