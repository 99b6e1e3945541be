"""Group snapshots (CSI GroupController): several volumes cut at one instant.

Each member is an ordinary snapshot, planned, copied and recorded by
services/snapshots.py (its own target volume and pair).  What a group adds is
the instant: no member's source is let go before every member's source is
held, so the images are of one moment across arrays and nodes.

Order of work:
  1. record the group (state CUTTING, member ids derived from the name): the
     intent, so a crash from here on is undone by `recover`;
  2. record every member's target and pair, uncut (the snapshot service's
     workers leave them alone while the group is CUTTING);
  3. `cut_group`: prepare every member (fresh target LUNs made; an unpublished
     source fenced), then the live cut of services/cut.py for all at once: the
     writes of every source in use held on its node, each cut, the clones and
     remote copy starts made, all let go (the writes wait milliseconds);
  4. the group is CUT; each member's copy runs, reading its cut's frozen view
     while the application writes on.
A failure anywhere before 4 undoes every member: cuts dropped, fences lifted,
LUNs freed, records dropped.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.model.group import GroupSnapshot, GroupState
from csi_virtvol.model.ids import GroupSnapshotId, VolumeId
from csi_virtvol.model.volume import VirtualVolume, VolumeKind, VolumeState
from csi_virtvol import failpoints
from csi_virtvol.services import cut, params as P
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.services.snapshots import SNAPSHOT_KEYS, SnapshotService
from csi_virtvol.services.volumes import VolumeService, volume_id_for
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)

GROUP_KEYS = SNAPSHOT_KEYS  # a group's parameters are its members' snapshot parameters
_NS = uuid.UUID("5b0c3f52-8f0e-4d55-9a3c-6f1f2b1f0d11")
POLL = 0.2


def group_id_for(name: str) -> GroupSnapshotId:
    """Deterministic: the same CSI name always maps to the same group id."""
    return GroupSnapshotId(f"vg-{uuid.uuid5(_NS, name)}")


def member_name(group_name: str, source_id: str) -> str:
    return f"group:{group_name}/{source_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupView:
    group: GroupSnapshot
    snapshots: tuple[VirtualVolume, ...]  # the members that still exist, in source order
    ready: bool


GROUP_POINTS = cut.Points(requested="group-hold-requested", held="group-held")


def cut_group(store: StateStore, snapshots: SnapshotService, members: Sequence[str]) -> None:
    """Cut every member at one instant: hold all, cut all, release all.

    Each member is prepared first (services/snapshots.py: its fresh target LUNs made, an
    unpublished source fenced, so any instant is its own; a snapshot never changes).  Then
    services/cut.cut_at_one_instant holds the writes of every member in use on its node (all
    nodes asked at once) and cuts it; once ALL are held, every member's clones are made and
    its remote copies started (`group-cut-N`), and all writes are let go.  The writes wait
    only for that (no copy runs meanwhile); each member's host copies then read its cut's
    frozen view.  A failure raises, every cut undone; the caller undoes every member.
    """
    prepared: list[cut.Prepared] = []
    for m in members:
        p = snapshots.prepare_member(m)
        if p is None:
            raise errors.Conflict(f"member {m} of a group being cut was cut on its own")
        prepared.append(p)

    def at_instant() -> None:
        for i, p in enumerate(prepared):
            failpoints.hit(f"group-cut-{i}")
            if p.at_instant is not None:
                p.at_instant()
    cut.cut_at_one_instant(store, [p.member for p in prepared], while_held=at_instant, points=GROUP_POINTS)
    for p in prepared:
        snapshots.mark_member(p)
    failpoints.hit("group-cut")


class GroupService:
    def __init__(self, *, store: StateStore, locks: KeyedLocks, volumes: VolumeService,
                 snapshots: SnapshotService, wait: float = 8.0) -> None:
        self._store = store
        self._locks = locks
        self._volumes = volumes
        self._snapshots = snapshots
        self._wait = wait
        snapshots.set_group_guard(self._cutting)

    def _cutting(self, vid: str) -> bool:
        """Whether `vid` is a member of a group not yet cut (its copy must not start alone)."""
        if not vid.startswith("vs-"):
            return False
        return any(g.value.state is GroupState.CUTTING and vid in g.value.members
                   for g in self._store.list(S.GROUPS))

    # -- queries ------------------------------------------------------------
    def get(self, group_id: str, *, snapshot_ids: Sequence[str] = ()) -> GroupView:
        if not group_id:
            raise errors.InvalidRequest("group_snapshot_id is required")
        rec = self._store.get(S.GROUPS, group_id)
        if not snapshot_ids:
            raise errors.InvalidRequest("snapshot_ids is required")
        if rec is None or rec.value.state is GroupState.CUTTING:
            raise errors.NotFound(f"group snapshot {group_id} does not exist")
        _check_members(rec.value, snapshot_ids)
        return self._view(rec.value)

    def _view(self, group: GroupSnapshot) -> GroupView:
        snaps = []
        for m in group.members:
            vrec = self._store.get(S.VOLUMES, m)
            if vrec is not None:
                snaps.append(vrec.value)
        ready = len(snaps) == len(group.members) and all(v.state is VolumeState.AVAILABLE for v in snaps)
        return GroupView(group=group, snapshots=tuple(snaps), ready=ready)

    # -- CreateVolumeGroupSnapshot --------------------------------------------
    def create(self, *, name: str, source_volume_ids: Sequence[str], parameters: Mapping[str, str]) -> GroupView:
        if not name:
            raise errors.InvalidRequest("name is required")
        if not source_volume_ids:
            raise errors.InvalidRequest("source_volume_ids must name at least one volume")
        if any(not s for s in source_volume_ids):
            raise errors.InvalidRequest("source_volume_ids holds an empty id")
        if len(set(source_volume_ids)) != len(source_volume_ids):
            raise errors.InvalidRequest("source_volume_ids names a volume twice")
        P.check_keys(parameters, GROUP_KEYS, what="group snapshot parameter")
        gid = group_id_for(name)
        sources = tuple(VolumeId(s) for s in source_volume_ids)
        with self._locks.hold(f"group-name/{name}", gid):
            rec = self._store.get(S.GROUPS, gid)
            if rec is not None and set(rec.value.sources) != set(sources):
                raise errors.AlreadyExists(
                    f"group snapshot {name} exists for volumes {', '.join(rec.value.sources)}")
            if rec is not None and rec.value.state is GroupState.CUTTING:
                log.warning("group %s: a cut was left half-way (crash); undoing it", gid)
                self._undo(rec.value)
                rec = None
            if rec is not None:
                failed = [(m, why) for m in rec.value.members if (why := self._snapshots.failure(m))]
                if failed:
                    log.warning("group %s: member %s failed (%s); cutting the whole group again",
                                gid, failed[0][0], failed[0][1])
                    self._undo(rec.value)
                    rec = None
            if rec is None:
                group = self._begin(gid=gid, name=name, sources=sources, parameters=dict(parameters))
            else:
                group = rec.value
        return self._await(group)

    def _begin(self, *, gid: GroupSnapshotId, name: str, sources: tuple[VolumeId, ...],
               parameters: dict[str, str]) -> GroupSnapshot:
        vols = [self._volumes.get(s) for s in sources]  # NotFound for a missing volume
        for v in vols:
            if v.state is not VolumeState.AVAILABLE:
                raise errors.PreconditionFailed(f"volume {v.id} is {v.state.value}")
        members = tuple(volume_id_for(member_name(name, s), VolumeKind.SNAPSHOT) for s in sources)
        group = GroupSnapshot(id=gid, name=name, sources=sources, members=members, state=GroupState.CUTTING,
                              parameters=parameters, created_at=time.time())
        self._store.create(S.GROUPS, group)  # the intent: undone by recover() after a crash
        try:
            failpoints.hit("group-recorded")
            for v, m in zip(vols, members):
                if self._store.get(S.VOLUMES, m) is not None:  # a left-over of an undone attempt
                    self._snapshots.discard_member(m)
                self._snapshots.record_member(snapshot_id=m, name=member_name(name, v.id), source=v,
                                              parameters=parameters)
            failpoints.hit("group-members-recorded")
            cut_group(self._store, self._snapshots, members)
            group = dataclasses.replace(group, state=GroupState.CUT, cut_at=time.time())
            S.upsert(self._store, S.GROUPS, group)
        except BaseException as e:
            log.warning("group %s: could not cut %s at one instant: %s; undoing every member",
                        gid, ", ".join(sources), e)
            self._undo(group)
            raise
        log.info("group %s (%s): %d volumes cut at one instant", gid, name, len(members))
        failpoints.hit("group-marked-cut")
        for m in members:
            self._snapshots.start_member(m)
        return group

    def _undo(self, group: GroupSnapshot) -> None:
        for m in group.members:
            self._snapshots.discard_member(m)
        self._store.delete(S.GROUPS, group.id)

    def _await(self, group: GroupSnapshot) -> GroupView:
        """Wait a little for the members' copies, so small groups answer ready."""
        deadline = time.monotonic() + self._wait
        while True:
            view = self._view(group)
            for m in group.members:
                why = self._snapshots.failure(m)
                if why:
                    raise errors.BackendError(f"member {m} of group {group.id} failed: {why}")
            if view.ready or time.monotonic() >= deadline:
                return view
            time.sleep(POLL)

    def groups_of(self) -> dict[str, str]:
        """Member snapshot id -> the id of the (cut) group it belongs to."""
        return {m: g.value.id for g in self._store.list(S.GROUPS) if g.value.state is GroupState.CUT
                for m in g.value.members}

    def delete_snapshot(self, snapshot_id: str) -> None:
        """DeleteSnapshot: a group's member goes only with its group (it carries group_snapshot_id)."""
        group = self.groups_of().get(snapshot_id)
        if group is not None:
            raise errors.PreconditionFailed(
                f"snapshot {snapshot_id} is a member of group snapshot {group}: delete the group")
        self._snapshots.delete_snapshot(snapshot_id)

    # -- DeleteVolumeGroupSnapshot -------------------------------------------
    def delete(self, group_id: str, *, snapshot_ids: Sequence[str]) -> None:
        if not group_id:
            raise errors.InvalidRequest("group_snapshot_id is required")
        if not snapshot_ids:
            raise errors.InvalidRequest("snapshot_ids is required")
        with self._locks.hold(group_id):
            rec = self._store.get(S.GROUPS, group_id)
            if rec is None:
                return
            _check_members(rec.value, snapshot_ids)
            self._undo(rec.value)

    # -- start-up -------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: a group left CUTTING was never cut at one instant; undo it whole."""
        for rec in self._store.list(S.GROUPS):
            if rec.value.state is GroupState.CUTTING:
                log.warning("group %s was being cut when the controller stopped; undoing it", rec.value.id)
                self._undo(rec.value)


def _check_members(group: GroupSnapshot, snapshot_ids: Sequence[str]) -> None:
    if set(snapshot_ids) != set(group.members):
        raise errors.InvalidRequest(
            f"snapshot_ids {sorted(snapshot_ids)} are not the members of group {group.id} "
            f"({sorted(group.members)})")
