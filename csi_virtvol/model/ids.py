"""Typed identifiers, so that a LUN id is never passed where a volume id goes."""
from __future__ import annotations

from typing import NewType

ArrayId = NewType("ArrayId", str)
LunId = NewType("LunId", str)
VolumeId = NewType("VolumeId", str)
SnapshotId = NewType("SnapshotId", str)
PairId = NewType("PairId", str)
GroupSnapshotId = NewType("GroupSnapshotId", str)
NodeId = NewType("NodeId", str)
Revision = NewType("Revision", str)
