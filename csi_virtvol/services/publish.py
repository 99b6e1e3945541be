"""ControllerPublish/Unpublish: attachments, and what the node needs to reach the LUNs."""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from csi_virtvol import errors
from csi_virtvol.model.capability import Capability, unsupported_reason
from csi_virtvol.model.ids import NodeId
from csi_virtvol.model.array import LunState
from csi_virtvol.model.node import NodeInfo
from csi_virtvol.model.volume import (VirtualVolume, VolumeKind, VolumeState, attachment_for,
                                      check_controller_publish)
from csi_virtvol.services import access, cut
from csi_virtvol.services.arrays import ArrayPool
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore
from csi_virtvol.transport import iscsi

log = logging.getLogger(__name__)

CTX_EXTENTS = "virtvol.csi.example.org/extents"
CTX_SIZE = "virtvol.csi.example.org/size"


def publish_context(vol: VirtualVolume, arrays: ArrayPool) -> dict[str, str]:
    """The extents as [LUN address, offset, length] in concatenation order; the node
    attaches each address (a path, an NBD URI, ...) itself."""
    extents = []
    for e in vol.extents:
        lun = arrays.driver(e.array).get_lun(lun_id=e.lun)
        if lun is None:
            raise errors.NotFound(f"LUN {e.array}/{e.lun} of volume {vol.id} is gone")
        extents.append([lun.address, e.offset, e.length])
    return {CTX_EXTENTS: json.dumps(extents, separators=(",", ":")), CTX_SIZE: str(vol.size)}


def extents_from_context(ctx: Mapping[str, str]) -> list[tuple[str, int, int]] | None:
    raw = ctx.get(CTX_EXTENTS)
    if not raw:
        return None
    try:
        return [(str(p), int(o), int(n)) for p, o, n in json.loads(raw)]
    except (ValueError, TypeError) as e:
        raise errors.InvalidRequest(f"publish_context {CTX_EXTENTS} is malformed") from e


class PublishService:
    def __init__(self, *, store: StateStore, arrays: ArrayPool, locks: KeyedLocks) -> None:
        self._store = store
        self._arrays = arrays
        self._locks = locks
        self._node_locks: dict[str, threading.Lock] = {}
        self._node_locks_guard = threading.Lock()

    @contextmanager
    def _node(self, node_id: str) -> Iterator[None]:
        """Publishes to one node wait for each other: the count of its volumes is checked
        and the new attachment recorded as one step."""
        with self._node_locks_guard:
            lock = self._node_locks.setdefault(node_id, threading.Lock())
        with lock:
            yield

    @staticmethod
    def register(store: StateStore, node: NodeInfo) -> None:
        """A node plugin announces itself, so ControllerPublish can tell real nodes."""
        S.upsert(store, S.NODES, node)

    def publish(self, volume_id: str, node_id: str, *, capability: Capability | None,
                readonly: bool) -> dict[str, str]:
        if not volume_id:
            raise errors.InvalidRequest("volume_id is required")
        if not node_id:
            raise errors.InvalidRequest("node_id is required")
        if capability is None:
            raise errors.InvalidRequest("volume_capability is required")
        reason = unsupported_reason(capability)
        if reason:
            raise errors.UnsupportedCapability(reason)
        with self._locks.hold(volume_id):
            rec = self._store.get(S.VOLUMES, volume_id)
            if rec is None or rec.value.kind is not VolumeKind.VOLUME or rec.value.state is VolumeState.DELETING:
                raise errors.NotFound(f"volume {volume_id} does not exist")
            node = self._store.get(S.NODES, node_id)
            if node is None:
                raise errors.NotFound(f"node {node_id} is not known to the driver")
            vol = rec.value
            if vol.state is not VolumeState.AVAILABLE:
                raise errors.PreconditionFailed(
                    f"volume {volume_id} is {vol.state.value}; it can be published when that ends")
            # a copy reading the LUNs does not hold the publish back: the node cuts the volume
            # before it writes it, and the copy reads that cut (services/cut.py)
            if cut.publish_mid_copy(self._store, vol.id, node=node_id, readonly=readonly):
                self._allow_luns(vol)
            self._check_luns(vol)
            want = attachment_for(NodeId(node_id), capability, readonly=readonly)
            if check_controller_publish(volume_id, vol.attachments, want):
                access.grant(self._arrays, self._store, node_id=node_id, extents=vol.extents)
                return publish_context(vol, self._arrays)
            with self._node(node_id):
                self._check_room(node_id, node.value.max_volumes)
                new = dataclasses.replace(vol, attachments=vol.attachments + (want,))
                access.grant(self._arrays, self._store, node_id=node_id, extents=vol.extents)
                try:
                    self._store.update(S.VOLUMES, new, revision=rec.revision)
                except BaseException:
                    access.revoke(self._arrays, self._store, node_id=node_id, extents=vol.extents)
                    raise
            log.info("volume %s published to node %s (%s)", volume_id, node_id, want.describe())
            return publish_context(new, self._arrays)

    def _check_room(self, node_id: str, limit: int) -> None:
        """The spec's "Max volumes attached": RESOURCE_EXHAUSTED when the node already holds
        the max_volumes_per_node its NodeGetInfo reported (0: no limit)."""
        if limit <= 0:
            return
        held = sum(1 for r in self._store.list(S.VOLUMES)
                   if r.value.kind is VolumeKind.VOLUME and r.value.attached_to(NodeId(node_id)) is not None)
        if held >= limit:
            raise errors.CapacityExceeded(
                f"node {node_id} already has {held} volume(s) published, its limit "
                f"(max_volumes_per_node {limit}); unpublish one first")

    def _allow_luns(self, vol: VirtualVolume) -> None:
        for e in vol.extents:
            key = f"{e.array}:{e.lun}"
            for _ in range(20):
                lrec = self._store.get(S.LUNS, key)
                if lrec is None or lrec.value.state is not LunState.ACCESS_PROHIBITED:
                    break
                try:
                    self._store.update(S.LUNS, dataclasses.replace(lrec.value, state=LunState.IN_USE),
                                       revision=lrec.revision)
                    break
                except errors.Conflict:
                    continue

    def _check_luns(self, vol: VirtualVolume) -> None:
        for e in vol.extents:
            lrec = self._store.get(S.LUNS, f"{e.array}:{e.lun}")
            if lrec is None:
                continue
            if lrec.value.state is LunState.ACCESS_PROHIBITED:
                raise errors.PreconditionFailed(
                    f"LUN {e.array}/{e.lun} of volume {vol.id} is access-prohibited while a copy "
                    "reads it; publish again when the copy ends")
            if lrec.value.state is LunState.FAILED:
                raise errors.PreconditionFailed(f"LUN {e.array}/{e.lun} of volume {vol.id} has failed")

    def unpublish(self, volume_id: str, node_id: str) -> None:
        if not volume_id:
            raise errors.InvalidRequest("volume_id is required")
        with self._locks.hold(volume_id):
            rec = self._store.get(S.VOLUMES, volume_id)
            if rec is None:
                return  # nothing to unpublish: success, as the spec says
            vol = rec.value
            keep = tuple(a for a in vol.attachments if node_id and a.node != node_id)
            if keep == vol.attachments:
                return
            for gone in vol.attachments:  # the array's ACL first: an error leaves the record, to retry
                if gone not in keep:
                    access.revoke(self._arrays, self._store, node_id=gone.node, extents=vol.extents)
            self._store.update(S.VOLUMES, dataclasses.replace(vol, attachments=keep), revision=rec.revision)
            log.info("volume %s unpublished from %s", volume_id, node_id or "every node")


def node_record(node_id: NodeId, topology: Mapping[str, str], max_volumes: int) -> NodeInfo:
    """This node as it announces itself, with its iSCSI initiator name when it has one."""
    try:
        initiator = iscsi.initiator_name()
    except errors.BackendUnavailable:
        initiator = ""
    return NodeInfo(id=node_id, topology=dict(topology), max_volumes=max_volumes, registered_at=time.time(),
                    initiator=initiator)
