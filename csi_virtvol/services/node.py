"""Node-side use cases: stage, publish, expand, stats, over node.stager."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from collections.abc import Mapping

from csi_virtvol import errors
from csi_virtvol.config import Config
from csi_virtvol.model.capability import AccessType, Capability, unsupported_reason
from csi_virtvol.model.node import NodeInfo
from csi_virtvol.model.volume import VirtualVolume, VolumeKind
from csi_virtvol.node import stager as node_stager
from csi_virtvol.node.layout import BackingExtent
from csi_virtvol.model.allocation import choose_size
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.services.publish import extents_from_context
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    bytes_total: int
    bytes_used: int
    bytes_available: int
    inodes_total: int
    inodes_used: int
    inodes_available: int
    abnormal: bool
    message: str


class NodeService:
    def __init__(self, *, config: Config, store: StateStore, locks: KeyedLocks) -> None:
        self._config = config
        self._store = store
        self._locks = locks
        self._stager = node_stager.Stager(config.node_state_dir)

    def info(self) -> NodeInfo:
        return NodeInfo(id=self._config.node_id, topology=dict(self._config.node_topology),
                        max_volumes=self._config.max_volumes_per_node)

    def _volume(self, volume_id: str) -> VirtualVolume:
        rec = self._store.get(S.VOLUMES, volume_id)
        if rec is None or rec.value.kind is not VolumeKind.VOLUME:
            raise errors.NotFound(f"volume {volume_id} does not exist")
        return rec.value

    def _backing(self, vol: VirtualVolume) -> list[BackingExtent]:
        out = []
        for e in vol.extents:
            lun = self._store.get(S.LUNS, f"{e.array}:{e.lun}")
            if lun is None or not lun.value.address:
                raise errors.NotFound(f"LUN {e.array}/{e.lun} of volume {vol.id} is not recorded")
            out.append(BackingExtent(path=lun.value.address, offset=e.offset, length=e.length))
        return out

    def stage(self, volume_id: str, staging_path: str, *, capability: Capability,
              publish_context: Mapping[str, str]) -> None:
        reason = unsupported_reason(capability)
        if reason:
            raise errors.UnsupportedCapability(reason)
        with self._locks.hold(volume_id):
            given = extents_from_context(publish_context)
            if given is not None:
                extents = [BackingExtent(path=p, offset=o, length=n) for p, o, n in given]
            else:
                extents = self._backing(self._volume(volume_id))
            access: node_stager.Access = "block" if capability.access_type is AccessType.BLOCK else "mount"
            self._stager.stage(volume_id, extents, staging_path, access=access,
                               fs_type=capability.fs_type or "ext4", mount_flags=list(capability.mount_flags),
                               readonly=capability.access_mode.read_only, mount_group=capability.mount_group)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        with self._locks.hold(volume_id):
            self._stager.unstage(volume_id, staging_path)

    def publish(self, volume_id: str, staging_path: str, target_path: str, *, capability: Capability,
                readonly: bool) -> None:
        reason = unsupported_reason(capability)
        if reason:
            raise errors.UnsupportedCapability(reason)
        with self._locks.hold(volume_id):
            access: node_stager.Access = "block" if capability.access_type is AccessType.BLOCK else "mount"
            self._stager.publish(volume_id, staging_path, target_path, access=access,
                                 readonly=readonly or capability.access_mode.read_only,
                                 mount_flags=capability.mount_flags, mount_group=capability.mount_group)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        with self._locks.hold(volume_id):
            self._stager.unpublish(target_path)

    def stats(self, volume_id: str, volume_path: str) -> Stats:
        staged = self._stager.get(volume_id)
        if staged is None:
            raise errors.NotFound(f"volume {volume_id} is not staged on this node")
        if not os.path.exists(volume_path):
            raise errors.NotFound(f"volume path {volume_path} does not exist")
        st = self._stager.stats(volume_path)
        cond = self._stager.condition(volume_id)
        return Stats(bytes_total=st.total_bytes, bytes_used=st.used_bytes or 0,
                     bytes_available=st.available_bytes or 0, inodes_total=st.total_inodes or 0,
                     inodes_used=st.used_inodes or 0, inodes_available=st.available_inodes or 0,
                     abnormal=cond.abnormal, message=cond.message)

    def expand(self, volume_id: str, volume_path: str, staging_path: str, *, required: int, limit: int) -> int:
        if required or limit:
            choose_size(required=required, limit=limit)  # validates the range
        with self._locks.hold(volume_id):
            vol = self._volume(volume_id)
            if self._stager.get(volume_id) is None:
                raise errors.NotFound(f"volume {volume_id} is not staged on this node")
            if not os.path.exists(volume_path):
                raise errors.NotFound(f"volume path {volume_path} does not exist")
            return self._stager.expand(volume_id, self._backing(vol))
