"""Node-side use cases: stage, publish, expand, stats, over node.stager."""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable, Mapping

from csi_virtvol import errors, failpoints
from csi_virtvol.config import Config
from csi_virtvol.model.capability import AccessType, Capability, Publication, check_node_publish, unsupported_reason
from csi_virtvol.model.ids import NodeId
from csi_virtvol.model.node import NodeInfo
from csi_virtvol.model.volume import VirtualVolume, VolumeKind
from csi_virtvol.model.pair import Fence, Pair
from csi_virtvol.node import capacity, commands
from csi_virtvol.node import stager as node_stager
from csi_virtvol.node.layout import BackingExtent
from csi_virtvol.model.allocation import choose_size
from csi_virtvol.services import cut
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.services.publish import extents_from_context
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore
from csi_virtvol.transport import Attacher

log = logging.getLogger(__name__)


XFS_MIN_SIZE = 300 * 1000 * 1000  # mkfs.xfs refuses smaller filesystems


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
        self._attacher = Attacher(os.path.join(config.node_state_dir, "attach"))
        self.fences = FenceKeeper(node_id=config.node_id, store=store, stager=self._stager,
                                  state_dir=config.node_state_dir, reap=self._reap)
        self.max_volumes = self._max_volumes()

    def _max_volumes(self) -> int:
        """The configured maxVolumesPerNode, else what this node can hold (node/capacity.py)."""
        if self._config.max_volumes_per_node > 0:
            log.info("max volumes per node: %d (maxVolumesPerNode)", self._config.max_volumes_per_node)
            return self._config.max_volumes_per_node
        n, why = capacity.max_volumes(composer=self._stager.composer_kind,
                                      nbd=any(a.kind == "qsd" for a in self._config.arrays))
        log.info("max volumes per node: %d (%s; set maxVolumesPerNode to choose)", n, why)
        return n

    def info(self) -> NodeInfo:
        return NodeInfo(id=self._config.node_id, topology=dict(self._config.node_topology),
                        max_volumes=self.max_volumes)

    def _volume(self, volume_id: str) -> VirtualVolume:
        rec = self._store.get(S.VOLUMES, volume_id)
        if rec is None or rec.value.kind is not VolumeKind.VOLUME:
            raise errors.NotFound(f"volume {volume_id} does not exist")
        return rec.value

    def _backing(self, vol: VirtualVolume) -> list[BackingExtent]:
        """The volume's extents over local paths: each LUN's address attached to this node."""
        addresses = []
        for e in vol.extents:
            lun = self._store.get(S.LUNS, f"{e.array}:{e.lun}")
            if lun is None or not lun.value.address:
                raise errors.NotFound(f"LUN {e.array}/{e.lun} of volume {vol.id} is not recorded")
            addresses.append(lun.value.address)
        paths = self._attacher.attach(user=vol.id, addresses=addresses)
        return [BackingExtent(path=p, offset=e.offset, length=e.length) for p, e in zip(paths, vol.extents)]

    def stage(self, volume_id: str, staging_path: str, *, capability: Capability,
              publish_context: Mapping[str, str]) -> None:
        reason = unsupported_reason(capability)
        if reason:
            raise errors.UnsupportedCapability(reason)
        with self._locks.hold(volume_id):
            # The store's layout is the truth: publish_context was fixed at ControllerPublish and
            # a CO does not publish again after ControllerExpandVolume, so it can be stale.
            rec = self._store.get(S.VOLUMES, volume_id)
            given = extents_from_context(publish_context)
            if rec is not None and rec.value.kind is VolumeKind.VOLUME:
                extents = self._backing(rec.value)
            elif given is not None:
                paths = self._attacher.attach(user=volume_id, addresses=[a for a, _, _ in given])
                extents = [BackingExtent(path=p, offset=o, length=n) for p, (_, o, n) in zip(paths, given)]
            else:
                raise errors.NotFound(f"volume {volume_id} does not exist")
            access: node_stager.Access = "block" if capability.access_type is AccessType.BLOCK else "mount"
            size = sum(e.length for e in extents)
            prior = self._stager.get(volume_id)
            if access == "mount" and capability.fs_type == "xfs" and size < XFS_MIN_SIZE and prior is None:
                raise errors.OutOfRange(
                    f"volume {volume_id} has {size} bytes; XFS needs at least {XFS_MIN_SIZE >> 20} MiB")
            readonly = capability.access_mode.read_only

            def cut_first() -> None:  # a copy reading the LUNs directly gets a cut before any write
                self.fences.cuts.cut_for_stage(
                    volume_id, size=size,
                    cut=lambda cut_id, limit: self._stager.cut_staging(volume_id, cut_id, store_limit=limit))
            in_use = prior is not None and prior.phase == "staged"   # the fence keeper cuts those
            self._stager.stage(volume_id, extents, staging_path, access=access,
                               fs_type=capability.fs_type or "ext4", mount_flags=list(capability.mount_flags),
                               readonly=readonly, mount_group=capability.mount_group,
                               before_use=None if readonly or in_use else cut_first)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        with self._locks.hold(volume_id):
            self._stager.unstage(volume_id, staging_path)
            if self._stager.get(volume_id) is None:   # retired (a cut stands): its LUNs stay until _reap
                self._attacher.detach_user(user=volume_id)

    def _reap(self) -> None:
        """Volumes unstaged while a cut stood: once their last cut ends, the rest goes."""
        for rec in self._stager.list_staged():
            if rec.phase != "retired" or not self._stager.reapable(rec.volume_id):
                continue   # (looked at without the volume's lock, which CSI calls on it would meet)
            try:
                with self._locks.hold(rec.volume_id):
                    if self._stager.reap(rec.volume_id):
                        self._attacher.detach_user(user=rec.volume_id)
            except errors.OperationPending:
                continue   # a stage or unstage of it runs: next time
            except errors.VirtvolError as e:
                log.warning("volume %s: could not take apart what its cuts kept: %s", rec.volume_id, e)

    def _staged(self, volume_id: str) -> node_stager.StagedVolume | None:
        rec = self._stager.get(volume_id)
        return rec if rec is not None and rec.phase != "retired" else None

    def publish(self, volume_id: str, staging_path: str, target_path: str, *, capability: Capability,
                readonly: bool) -> None:
        """NodePublishVolume under the spec's rules for a volume published more than once on a
        node (model.capability.check_node_publish).  The target is read-only when the request
        says so, when the access mode is a reader's (whatever the flag: a CO may leave it false
        for a ReadOnlyMany volume), when ControllerPublish made this node's attachment readonly,
        or when the volume is staged read-only."""
        reason = unsupported_reason(capability)
        if reason:
            raise errors.UnsupportedCapability(reason)
        target_path = os.path.normpath(target_path)
        with self._locks.hold(volume_id):
            access: node_stager.Access = "block" if capability.access_type is AccessType.BLOCK else "mount"
            want = Publication(target=target_path, access_type=capability.access_type,
                               access_mode=capability.access_mode, readonly=readonly,
                               fs_type=capability.fs_type, mount_flags=capability.mount_flags,
                               mount_group=capability.mount_group)
            if check_node_publish(volume_id, self._stager.publications(volume_id), want):
                return
            self._stager.publish(volume_id, staging_path, target_path, access=access,
                                 readonly=self._read_only(volume_id, capability, readonly=readonly),
                                 mount_flags=capability.mount_flags, mount_group=capability.mount_group,
                                 publication=want)

    def _read_only(self, volume_id: str, capability: Capability, *, readonly: bool) -> bool:
        if readonly or capability.access_mode.read_only:
            return True
        staged = self._stager.get(volume_id)
        if staged is not None and staged.readonly:
            return True
        rec = self._store.get(S.VOLUMES, volume_id)
        mine = rec.value.attached_to(NodeId(self._config.node_id)) if rec is not None else None
        return mine is not None and mine.readonly

    def unpublish(self, volume_id: str, target_path: str) -> None:
        with self._locks.hold(volume_id):
            self._stager.unpublish(target_path, volume_id=volume_id)

    def stats(self, volume_id: str, volume_path: str) -> Stats:
        staged = self._staged(volume_id)
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
            if self._staged(volume_id) is None:
                raise errors.NotFound(f"volume {volume_id} is not staged on this node")
            if not os.path.exists(volume_path):
                raise errors.NotFound(f"volume path {volume_path} does not exist")
            return self._stager.expand(volume_id, self._backing(vol))


MAX_FREEZE = 600.0  # seconds a node holds a volume's writes for one image at most


class FenceKeeper:
    """The node's side of the pair fence protocol (see model.pair.Fence).

    Live cuts (CUT_REQUESTED, ...: writes held for an instant) are services/cut.CutKeeper's;
    what follows is the freeze it falls back to where the composition cannot cut.
    When the controller asks (FREEZE_REQUESTED, fence_node = this node) it
    freezes the filesystem of the staged source (fsfreeze: dirty data is
    flushed, then writes wait), answers FROZEN, and thaws when the pair says
    RELEASED, goes away, or has been held MAX_FREEZE seconds.  Raw block
    volumes cannot be held this way; it answers REFUSED with the reason.
    """

    def __init__(self, *, node_id: str, store: StateStore, stager: node_stager.Stager, state_dir: str,
                 reap: Callable[[], None] = lambda: None) -> None:
        self._node = node_id
        self._store = store
        self._stager = stager
        self._reap = reap
        self._held: dict[str, tuple[str, float]] = {}  # pair id -> (mount point, since)
        self._adopted = False
        self.cuts = cut.CutKeeper(node_id=node_id, store=store, stager=stager, state_dir=state_dir,
                                  fallback=lambda p: self._freeze(p.id, p.source))

    def run(self, stop: "threading.Event") -> None:
        while not stop.is_set():
            try:
                self.scan()
                for _ in self._store.watch(S.PAIRS, timeout=0.5):
                    break  # something changed: scan again at once
            except errors.VirtvolError as e:
                log.warning("fence keeper: %s", e)
                stop.wait(1.0)
            except Exception:   # a bug, or a tool failing unexpectedly: never stop answering fences
                log.exception("fence keeper: unexpected failure; scanning again")
                stop.wait(1.0)
        for pair_id in list(self._held):
            self._thaw(pair_id)
        self.cuts.release_all()
        self._settle()

    def _settle(self) -> None:
        """On the way out, a last look at the pairs: the cuts of copies that ended or were
        deleted since the last scan end, and volumes unstaged while they stood are taken
        apart, so a stop right after (a DaemonSet rollout, the demo) leaves none of them
        behind for the next start to find.  No cut is begun and no write is held."""
        try:
            self.cuts.sweep({str(r.value.id): r.value for r in self._store.list(S.PAIRS)})
            self._reap()
        except errors.VirtvolError as e:
            log.warning("fence keeper: a last clean-up on the way out failed (the next start does it): %s", e)

    def scan(self) -> None:
        seen = set()
        pairs = {str(r.value.id): r.value for r in self._store.list(S.PAIRS)}
        failpoints.hit("cut-node-scanned")   # the pairs read, nothing done yet
        if not self._adopted:
            self._adopt(pairs)
        self.cuts.scan(pairs)
        self._reap()
        for pair in pairs.values():
            seen.add(pair.id)
            mine = pair.fence_node == self._node
            if mine and pair.fence is Fence.FREEZE_REQUESTED:
                self._freeze(pair.id, pair.source)
            elif pair.id in self._held and pair.fence is not Fence.FROZEN:
                self._thaw(pair.id)
            elif pair.id in self._held and time.monotonic() - self._held[pair.id][1] > MAX_FREEZE:
                self._thaw(pair.id)
                self._answer(pair.id, Fence.REFUSED, f"writes were held for {MAX_FREEZE:.0f}s; released")
        for pair_id in set(self._held) - seen:
            self._thaw(pair_id)

    def _adopt(self, pairs: Mapping[str, Pair]) -> None:
        """After a restart: the filesystems this node froze for pairs still FROZEN stay frozen
        (their copies read the live device) and are thawed when those pairs let go."""
        self._adopted = True
        for pair in pairs.values():
            if pair.fence_node != self._node or pair.fence is not Fence.FROZEN or pair.id in self._held:
                continue
            staged = self._stager.get(pair.source)
            if staged is not None and staged.access == "mount":
                log.info("pair %s: %s was frozen by this node before it restarted; holding it", pair.id,
                         staged.staging_path)
                self._held[pair.id] = (staged.staging_path, time.monotonic())

    def _answer(self, pair_id: str, fence: Fence, message: str = "") -> None:
        for _ in range(20):
            rec = self._store.get(S.PAIRS, pair_id)
            if rec is None:
                return
            try:
                self._store.update(S.PAIRS, dataclasses.replace(rec.value, fence=fence, fence_message=message),
                                   revision=rec.revision)
                return
            except errors.Conflict:
                continue

    def _freeze(self, pair_id: str, volume_id: str) -> None:
        if pair_id in self._held:
            self._answer(pair_id, Fence.FROZEN)
            return
        staged = self._stager.get(volume_id)
        if staged is None:
            self._answer(pair_id, Fence.REFUSED, f"volume {volume_id} is not staged on node {self._node}")
            return
        if staged.access != "mount":
            self._answer(pair_id, Fence.REFUSED,
                         f"volume {volume_id} is a raw block volume in use on {self._node}: its writes cannot be "
                         "held; unpublish it, or keep it on arrays that copy internally")
            return
        try:
            commands.run(["fsfreeze", "--freeze", staged.staging_path])
        except errors.VirtvolError as e:
            self._answer(pair_id, Fence.REFUSED, f"fsfreeze failed: {e}")
            return
        self._held[pair_id] = (staged.staging_path, time.monotonic())
        log.info("pair %s: holding the writes of %s (froze %s)", pair_id, volume_id, staged.staging_path)
        self._answer(pair_id, Fence.FROZEN)

    def _thaw(self, pair_id: str) -> None:
        held = self._held.pop(pair_id, None)
        if held is None:
            return
        try:
            commands.run(["fsfreeze", "--unfreeze", held[0]])
        except errors.VirtvolError as e:
            log.error("pair %s: could not thaw %s: %s", pair_id, held[0], e)
            return
        log.info("pair %s: writes of %s let go after %.2fs", pair_id, held[0], time.monotonic() - held[1])
