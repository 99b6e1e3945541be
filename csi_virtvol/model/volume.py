"""Virtual volumes and their mapping: the seed's tables 110 and 130."""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from csi_virtvol import errors
from csi_virtvol.model.capability import AccessMode, AccessType, Capability
from csi_virtvol.model.ids import ArrayId, LunId, NodeId, VolumeId


@dataclass(frozen=True, slots=True, kw_only=True)
class Extent:
    """A run of a LUN, in concatenation order (seed [0056]-[0057])."""

    array: ArrayId
    lun: LunId
    offset: int  # byte offset inside the LUN
    length: int  # bytes contributed to the virtual volume


class VolumeState(enum.Enum):
    CREATING = "creating"    # intent recorded; LUNs may be partly provisioned
    AVAILABLE = "available"
    COPYING = "copying"      # being filled from a content source
    DELETING = "deleting"    # intent recorded; LUNs may be partly freed
    FAILED = "failed"


class CopyRole(enum.Enum):
    """The seed's multiplexing attribute: is this volume a pair's source or copy?"""

    NONE = "none"
    SOURCE = "source"
    COPY = "copy"


class VolumeKind(enum.Enum):
    VOLUME = "volume"
    SNAPSHOT = "snapshot"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """A ControllerPublishVolume that holds: the node, and the capability and readonly flag
    it was made with (UNKNOWN / None in records written before they were kept)."""

    node: NodeId
    readonly: bool
    access_mode: AccessMode = AccessMode.UNKNOWN
    access_type: AccessType | None = None

    def describe(self) -> str:
        kind = f"{self.access_type.value} " if self.access_type else ""
        mode = self.access_mode.name if self.access_mode is not AccessMode.UNKNOWN else "(mode not recorded)"
        return f"{kind}{mode} {'readonly' if self.readonly else 'read-write'}"


def check_controller_publish(volume_id: str, attachments: tuple[Attachment, ...], new: Attachment) -> bool:
    """ControllerPublishVolume's rules for `new` against the volume's attachments.  True: the
    volume is already published so to that node (idempotent).  False: go ahead.  Raises
    AlreadyExists (published to that node with another capability or readonly flag) or
    PreconditionFailed (published to another node, and not both MULTI_NODE_READER_ONLY: the
    only MULTI_NODE mode this driver serves)."""
    for old in attachments:
        if old.node != new.node:
            continue
        legacy = old.access_mode is AccessMode.UNKNOWN  # recorded before modes were kept
        if old.readonly == new.readonly and (legacy or (old.access_mode, old.access_type)
                                             == (new.access_mode, new.access_type)):
            return True
        raise errors.AlreadyExists(
            f"volume {volume_id} is published to node {new.node} as {old.describe()}, not {new.describe()}")
    others = [a for a in attachments if a.node != new.node]
    shared = new.access_mode is AccessMode.MULTI_NODE_READER_ONLY and all(
        a.access_mode in (AccessMode.MULTI_NODE_READER_ONLY, AccessMode.UNKNOWN) for a in others)
    if others and not shared:
        raise errors.PreconditionFailed(
            f"volume {volume_id} is published to node {others[0].node} as {others[0].describe()}; "
            f"{new.access_mode.name} to node {new.node} needs it unpublished there first "
            "(only MULTI_NODE_READER_ONLY volumes are published to several nodes)")
    return False


def attachment_for(node: NodeId, capability: Capability, *, readonly: bool) -> Attachment:
    return Attachment(node=node, readonly=readonly, access_mode=capability.access_mode,
                      access_type=capability.access_type)


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualVolume:
    """A CSI volume or snapshot image.  Both are virtual volumes (seed [0085])."""

    id: VolumeId
    name: str
    size: int
    extents: tuple[Extent, ...]
    kind: VolumeKind = VolumeKind.VOLUME
    state: VolumeState = VolumeState.CREATING
    address: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    mutable_parameters: Mapping[str, str] = field(default_factory=dict)
    content_source: str = ""  # "snapshot:<id>" or "volume:<id>", "" when blank
    source_volume: str = ""   # for snapshots: the volume they image
    role: CopyRole = CopyRole.NONE
    attachments: tuple[Attachment, ...] = ()
    topology: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    message: str = ""

    @property
    def extents_size(self) -> int:
        return sum(e.length for e in self.extents)

    def attached_to(self, node: NodeId) -> Attachment | None:
        for a in self.attachments:
            if a.node == node:
                return a
        return None


def volume_address(volume_id: VolumeId) -> str:
    """The seed's virtual SAN address ([0028]): a name that no physical device has."""
    return f"virtvol://{volume_id}"
