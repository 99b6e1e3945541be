"""Nodes that registered with the driver (their node plugin ran NodeGetInfo)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from csi_virtvol.model.ids import NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    id: NodeId
    topology: Mapping[str, str] = field(default_factory=dict)
    max_volumes: int = 0
    registered_at: float = 0.0
    initiator: str = ""  # the node's iSCSI initiator name (IQN), for arrays that fence by host
