"""Group snapshots: several volumes' snapshots cut at one instant (CSI GroupController)."""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from csi_virtvol.model.ids import GroupSnapshotId, VolumeId


class GroupState(enum.Enum):
    CUTTING = "cutting"  # intent recorded: members are being recorded, fenced and cut; undone after a crash
    CUT = "cut"          # every member was cut at one instant; their copies may still run


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSnapshot:
    """A VolumeGroupSnapshot: one snapshot per source volume, `members[i]` imaging `sources[i]`."""

    id: GroupSnapshotId
    name: str
    sources: tuple[VolumeId, ...]
    members: tuple[VolumeId, ...]
    state: GroupState = GroupState.CUTTING
    parameters: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    cut_at: float = 0.0  # when all members were held at once (0: not yet)
