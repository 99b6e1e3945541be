"""Virtual volumes and their mapping: the seed's tables 110 and 130."""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    node: NodeId
    readonly: bool


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
