"""Virtual volumes: create, delete, expand, modify, list (seed drawings 8 and 11).

Crash safety without multi-record transactions: before any LUN is provisioned
the volume record is written in state CREATING with its planned extents, and
LUN names are derived from the volume id.  A retried CreateVolume resumes from
that record; `recover()` at start-up rolls unfinished creates back, finishes
unfinished deletes and removes LUNs that no record owns.  So a crash at any
point leaves neither a half-made volume nor an orphaned LUN.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol
from dataclasses import dataclass, field

from csi_virtvol import errors
from csi_virtvol.config import Config
from csi_virtvol.model.allocation import (ALIGN, Candidate, Layout, LunNamer, PlannedExtent,
                                          choose_size, plan_extents)
from csi_virtvol.model.array import Ability, ArrayInfo, Lun, LunOrigin, LunState
from csi_virtvol.model.capability import Capability, unsupported_reason
from csi_virtvol.model.ids import ArrayId, LunId, Revision, VolumeId
from csi_virtvol.model.volume import Extent, VirtualVolume, VolumeKind, VolumeState, volume_address
from csi_virtvol.services import params as P
from csi_virtvol.services.arrays import OWNED_PREFIXES, ArrayPool, TopologyFilter
from csi_virtvol.services import access, tracking
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)

_NS = uuid.UUID("6f1c1d52-58c4-4c43-9a64-3d4f1c0a7e11")


def volume_id_for(name: str, kind: VolumeKind = VolumeKind.VOLUME) -> VolumeId:
    """Deterministic: the same CSI name always maps to the same id."""
    prefix = "vv" if kind is VolumeKind.VOLUME else "vs"
    return VolumeId(f"{prefix}-{uuid.uuid5(_NS, f'{kind.value}/{name}')}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateVolume:
    name: str
    required_bytes: int = 0
    limit_bytes: int = 0
    parameters: Mapping[str, str] = field(default_factory=dict)
    mutable_parameters: Mapping[str, str] = field(default_factory=dict)
    capabilities: tuple[Capability, ...] = ()
    requisite: tuple[Mapping[str, str], ...] = ()
    preferred: tuple[Mapping[str, str], ...] = ()
    content_source: str = ""


class Cloner(Protocol):
    def __call__(self, *, vid: VolumeId, req: "CreateVolume", size: int, place: P.Placement) -> VirtualVolume: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    volumes: tuple[VirtualVolume, ...]
    next_token: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    abnormal: bool
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Capacity:
    available: int
    maximum_volume_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MappedExtent:
    """One row of the mapping (seed table 130), with what an operator wants to know of its LUN."""

    extent: Extent
    address: str                  # the LUN's address ("" when the array does not report it)
    abilities: tuple[str, ...]    # the array's effective abilities


class VolumeService:
    def __init__(self, *, config: Config, store: StateStore, arrays: ArrayPool, locks: KeyedLocks) -> None:
        self._config = config
        self._store = store
        self._arrays = arrays
        self._locks = locks
        self._cloner: Cloner | None = None
        self._busy: Callable[[str], str] = lambda vid: ""
        self._discard: Callable[[str], None] | None = None

    def set_cloner(self, cloner: "Cloner", busy: Callable[[str], str],
                   discard: Callable[[str], None] | None = None) -> None:
        """The snapshot service fills volumes that have a content source, and says
        which volumes are the source of a copy in progress."""
        self._cloner = cloner
        self._busy = busy
        self._discard = discard

    # -- queries -----------------------------------------------------------
    def get(self, volume_id: str, *, kind: VolumeKind = VolumeKind.VOLUME) -> VirtualVolume:
        rec = self._store.get(S.VOLUMES, volume_id)
        if rec is None or rec.value.kind is not kind or rec.value.state is VolumeState.DELETING:
            raise errors.NotFound(f"{kind.value} {volume_id} does not exist")
        return rec.value

    def page(self, *, after: str = "", limit: int = 0, kind: VolumeKind = VolumeKind.VOLUME) -> Page:
        """Stable pagination: the token is the last id returned."""
        if limit < 0:
            raise errors.InvalidRequest(f"max_entries must not be negative: {limit}")
        if after and self._store.get(S.VOLUMES, after) is None and not self._token_ok(after, kind):
            raise errors.InvalidToken(f"starting_token {after!r} is not valid")
        out: list[VirtualVolume] = []
        # ids of one kind share a prefix and the store lists by key: start at the prefix and
        # stop past it, so listing volumes never reads the snapshots (and the other way round)
        prefix = "vv-" if kind is VolumeKind.VOLUME else "vs-"
        cursor = max(after, prefix)
        batch = max(limit, 64)
        while True:
            recs = self._store.list(S.VOLUMES, after=cursor, limit=batch)
            for r in recs:
                if not r.value.id.startswith(prefix):
                    return Page(volumes=tuple(out), next_token="")
                cursor = r.value.id
                v = r.value
                if v.kind is kind and v.state in (VolumeState.AVAILABLE, VolumeState.COPYING):
                    if limit and len(out) == limit:
                        return Page(volumes=tuple(out), next_token=out[-1].id)
                    out.append(v)
            if len(recs) < batch:
                return Page(volumes=tuple(out), next_token="")

    @staticmethod
    def _token_ok(token: str, kind: VolumeKind) -> bool:
        # a token whose volume was deleted since is still a valid position
        prefix = "vv-" if kind is VolumeKind.VOLUME else "vs-"
        try:
            uuid.UUID(token[len(prefix):])
        except ValueError:
            return False
        return token.startswith(prefix)

    def mapping(self, volume_id: str) -> tuple[VirtualVolume, tuple[MappedExtent, ...]]:
        """A volume's or snapshot's extents in order, each with its LUN's address and its
        array's abilities (the admin Mapping API: CSI has no call for it)."""
        if not volume_id:
            raise errors.InvalidRequest("volume_id is required")
        rec = self._store.get(S.VOLUMES, volume_id)
        if rec is None or rec.value.state is VolumeState.DELETING:
            raise errors.NotFound(f"no volume or snapshot {volume_id}")
        out = []
        for e in rec.value.extents:
            lun = self._store.get(S.LUNS, f"{e.array}:{e.lun}")
            known = e.array in self._arrays.ids()  # not an array no longer configured
            abilities = tuple(self._arrays.info(e.array, fresh=False).abilities.names()) if known else ()
            out.append(MappedExtent(extent=e, address=lun.value.address if lun is not None else "",
                                    abilities=abilities))
        return rec.value, tuple(out)

    def condition(self, volume: VirtualVolume) -> Condition:
        """Derived from the LUN states and the arrays' view of each LUN."""
        problems = []
        for e in volume.extents:
            rec = self._store.get(S.LUNS, f"{e.array}:{e.lun}")
            if rec is not None and rec.value.state is LunState.FAILED:
                problems.append(f"LUN {e.array}/{e.lun} failed")
                continue
            try:
                lun = self._arrays.driver(e.array).get_lun(lun_id=e.lun)
            except errors.VirtvolError as exc:
                problems.append(f"array {e.array} unreachable: {exc}")
                continue
            if lun is None:
                problems.append(f"LUN {e.array}/{e.lun} is missing")
            elif lun.size < e.offset + e.length:
                problems.append(f"LUN {e.array}/{e.lun} is smaller than its extent")
        if problems:
            return Condition(abnormal=True, message="; ".join(problems))
        return Condition(abnormal=False, message=f"{len(volume.extents)} extent(s) healthy")

    def capacity(self, *, parameters: Mapping[str, str], topology: Mapping[str, str] | None) -> Capacity:
        place = P.placement(parameters)
        infos = self._arrays.select(names=place.arrays, selector=place.selector,
                                    topology_ok=TopologyFilter([topology] if topology else []))
        frees = [i.capacity_free - i.capacity_free % ALIGN for i in infos]
        intact = {i.id: self._intact_luns(i.id) for i in infos}
        frees = [f + sum(x.size for x in intact[i.id]) for f, i in zip(frees, infos)]
        if place.layout == "single":
            return Capacity(available=sum(frees), maximum_volume_size=max(frees, default=0))
        return Capacity(available=sum(frees), maximum_volume_size=sum(frees))

    # -- create --------------------------------------------------------------
    def create(self, req: CreateVolume) -> VirtualVolume:
        if not req.name:
            raise errors.InvalidRequest("name is required")
        if not req.capabilities:
            raise errors.InvalidRequest("volume_capabilities are required")
        for cap in req.capabilities:
            reason = unsupported_reason(cap)
            if reason:
                raise errors.UnsupportedCapability(reason)
        place = P.placement(req.parameters, req.mutable_parameters)
        size = choose_size(required=req.required_bytes, limit=req.limit_bytes)
        vid = volume_id_for(req.name)
        if req.content_source:
            existing = self._store.get(S.VOLUMES, vid)
            if existing is not None:
                self._check_same(existing.value, req, size)
            if self._cloner is None:
                raise errors.UnsupportedCapability("volume content sources are not supported")
            return self._cloner(vid=vid, req=req, size=size, place=place)
        with self._locks.hold(f"name/{req.name}", vid):
            existing = self._store.get(S.VOLUMES, vid)
            if existing is not None:
                vol = existing.value
                self._check_same(vol, req, size)
                if vol.state is VolumeState.AVAILABLE:
                    return vol
                if vol.state is VolumeState.DELETING:
                    raise errors.OperationPending(f"volume {vid} is being deleted")
                return self._provision(existing.value, existing.revision)
            vol = self._plan(vid=vid, req=req, size=size, place=place)
            rev = self._store.create(S.VOLUMES, vol)
            return self._provision(vol, rev)

    def _check_same(self, vol: VirtualVolume, req: CreateVolume, size: int) -> None:
        if P.user_parameters(vol.parameters) != P.user_parameters(req.parameters):
            raise errors.AlreadyExists(f"volume {req.name} exists with other parameters")
        if vol.content_source != req.content_source:
            raise errors.AlreadyExists(f"volume {req.name} exists with another content source")
        if vol.size < req.required_bytes or (req.limit_bytes and vol.size > req.limit_bytes):
            raise errors.AlreadyExists(
                f"volume {req.name} exists with size {vol.size}, outside the requested range")

    def _intact_luns(self, array: ArrayId) -> tuple[Lun, ...]:
        # LUNs that belong to no volume, by index: not a scan of every LUN of the array
        return tuple(r.value for r in self._store.find(S.LUNS, index="volume", value="")
                     if r.value.array == array and r.value.state is LunState.INTACT
                     and r.value.origin is LunOrigin.DISCOVERED)

    def _intact_by_array(self) -> dict[ArrayId, tuple[Lun, ...]]:
        """`_intact_luns` of every array, from one index look-up."""
        out: dict[ArrayId, list[Lun]] = {}
        for r in self._store.find(S.LUNS, index="volume", value=""):
            if r.value.state is LunState.INTACT and r.value.origin is LunOrigin.DISCOVERED:
                out.setdefault(r.value.array, []).append(r.value)
        return {a: tuple(v) for a, v in out.items()}

    def _groups(self, infos: Sequence[ArrayInfo]) -> list[list[ArrayInfo]]:
        """Arrays that can serve one volume together: same (or no) topology."""
        groups: dict[tuple[tuple[str, str], ...], list[ArrayInfo]] = {}
        shared = [i for i in infos if not i.topology]
        for i in infos:
            if i.topology:
                groups.setdefault(tuple(sorted(i.topology.items())), []).append(i)
        if not groups:
            return [shared] if shared else []
        # each group keeps the order asked for (parameter `arrays` is a preference order)
        return [[i for i in infos if i in g or not i.topology] for g in groups.values()]

    def _plan(self, *, vid: VolumeId, req: CreateVolume, size: int, place: P.Placement) -> VirtualVolume:
        segments = list(req.preferred) + [s for s in req.requisite if s not in req.preferred]
        topo_ok = TopologyFilter(list(req.requisite)) if req.requisite else None
        infos = self._arrays.select(names=place.arrays, selector=place.selector, topology_ok=topo_ok)
        if not infos:
            raise errors.CapacityExceeded("no configured array matches the parameters and topology")
        groups = self._groups(infos)
        if segments:  # preferred topology first
            groups.sort(key=lambda g: next((n for n, s in enumerate(segments)
                                             if TopologyFilter([s])(_topology_of(g))), len(segments)))
        intact = self._intact_by_array()
        total = sum(i.capacity_total for i in infos) + sum(
            x.size for i in infos for x in intact.get(i.id, ()))
        if size > total:
            raise errors.OutOfRange(
                f"{size} bytes can never fit: the eligible arrays hold {total} bytes in all")
        layouts = {"single": [Layout.SINGLE], "concat": [Layout.CONCAT],
                   "auto": [Layout.SINGLE, Layout.CONCAT]}[place.layout]
        if place.max_extent and place.layout == "auto" and size > place.max_extent:
            layouts = [Layout.CONCAT]
        last: errors.VirtvolError | None = None
        for layout in layouts:
            for group in groups:
                cands = [Candidate(array=i.id, free=i.capacity_free, intact=intact.get(i.id, ()))
                         for i in group]
                try:
                    planned = plan_extents(size=size, candidates=cands, layout=layout,
                                           max_extent=place.max_extent, lun_name=LunNamer(prefix=vid))
                except errors.CapacityExceeded as e:
                    last = e
                    continue
                return VirtualVolume(
                    id=vid, name=req.name, size=size, extents=_extents(planned),
                    state=VolumeState.CREATING, address=volume_address(vid),
                    parameters=dict(req.parameters), mutable_parameters=dict(req.mutable_parameters),
                    content_source=req.content_source, topology=_topology_of(group),
                    created_at=time.time(),
                )
        assert last is not None
        raise last

    def _provision(self, vol: VirtualVolume, rev: Revision) -> VirtualVolume:
        """Make every planned LUN exist and be ours; then mark the volume available.

        The CREATING record (the intent) is already durable.  The LUN records and
        the AVAILABLE state go in one `apply` at the end: one commit, not one per
        LUN.  A crash before it leaves LUNs that only the CREATING record names,
        which a retry claims again (create_lun is idempotent by name) and
        recover() rolls back."""
        made: list[Extent] = []
        writes: list[S.Write] = []
        try:
            for e in vol.extents:
                w = self._claim_lun(vol, e)
                if w is not None:
                    writes.append(w)
                made.append(e)
        except errors.VirtvolError:
            log.warning("volume %s: provisioning failed; rolling back %d LUN(s)", vol.id, len(made))
            self._rollback(vol)
            raise
        done = dataclasses.replace(vol, state=VolumeState.AVAILABLE)
        # if this fails the volume stays CREATING with its LUNs made: a retry resumes it
        self._store.apply([*writes, S.Put(table=S.VOLUMES, record=done, revision=rev)])
        log.info("volume %s (%s): %d bytes on %s", vol.id, vol.name, vol.size,
                 ", ".join(f"{e.array}/{e.lun}[{e.length}]" for e in vol.extents))
        return done

    def _claim_lun(self, vol: VirtualVolume, e: Extent) -> S.Write | None:
        """Make (or take) the extent's LUN; the store write that records it as the volume's."""
        key = f"{e.array}:{e.lun}"
        rec = self._store.get(S.LUNS, key)
        driver = self._arrays.driver(e.array)
        if rec is not None and rec.value.origin is LunOrigin.DISCOVERED:
            if rec.value.volume and rec.value.volume != vol.id:
                raise errors.Conflict(f"LUN {key} was taken by {rec.value.volume}")
            if rec.value.volume != vol.id:
                return S.Put(table=S.LUNS, record=dataclasses.replace(
                    rec.value, state=LunState.IN_USE, volume=vol.id), revision=rec.revision)
            return None
        lun = driver.create_lun(name=e.lun, size=e.length)
        claimed = dataclasses.replace(lun, state=LunState.IN_USE, origin=LunOrigin.PROVISIONED, volume=vol.id)
        if rec is None:
            return S.Put(table=S.LUNS, record=claimed)
        if rec.value != claimed:
            return S.Put(table=S.LUNS, record=claimed, revision=rec.revision)
        return None

    def _rollback(self, vol: VirtualVolume) -> None:
        writes = [w for e in vol.extents if (w := self._free_extent(vol.id, e)) is not None]
        self._store.apply([*writes, S.Remove(table=S.VOLUMES, key=vol.id)])

    def _free_extent(self, vid: VolumeId, e: Extent) -> S.Write | None:
        """Give a LUN back: ours are deleted, discovered ones wiped and made intact.
        Returns the store write that records it (the caller applies it)."""
        key = f"{e.array}:{e.lun}"
        rec = self._store.get(S.LUNS, key)
        driver = self._arrays.driver(e.array)
        if rec is not None and rec.value.origin is LunOrigin.DISCOVERED:
            if rec.value.volume == vid:
                driver.wipe_lun(lun_id=e.lun)
                return S.Put(table=S.LUNS, record=dataclasses.replace(
                    rec.value, state=LunState.INTACT, volume=""), revision=rec.revision)
            return None
        if rec is not None and rec.value.volume not in ("", vid):
            return None  # not ours
        driver.delete_lun(lun_id=e.lun)
        return None if rec is None else S.Remove(table=S.LUNS, key=key)

    def _free_extents(self, vid: VolumeId, extents: Sequence[Extent]) -> None:
        """Free the extents now, with one store commit for all of them."""
        self._store.apply([w for e in extents if (w := self._free_extent(vid, e)) is not None])

    # -- delete --------------------------------------------------------------
    def delete(self, volume_id: str, *, kind: VolumeKind = VolumeKind.VOLUME) -> None:
        if not volume_id:
            raise errors.InvalidRequest("volume_id is required")
        with self._locks.hold(volume_id):
            rec = self._store.get(S.VOLUMES, volume_id)
            if rec is None:
                return
            vol = rec.value
            if vol.kind is not kind:
                return  # ids of the other kind are "not found", and deleting those succeeds
            if vol.attachments:
                nodes = ", ".join(a.node for a in vol.attachments)
                raise errors.PreconditionFailed(f"volume {volume_id} is still published to {nodes}")
            busy = self._busy(volume_id)
            if busy:
                raise errors.PreconditionFailed(f"volume {volume_id} cannot be deleted now: {busy}")
        if vol.state is VolumeState.COPYING and self._discard is not None:
            self._discard(volume_id)  # a clone still being filled: cancel the copy first
            return
        with self._locks.hold(volume_id):
            rec = self._store.get(S.VOLUMES, volume_id)
            if rec is not None:
                self._destroy(rec.value, rec.revision)

    def destroy(self, vol: VirtualVolume) -> None:
        """Free a volume's LUNs and drop its record (callers hold its lock)."""
        rec = self._store.get(S.VOLUMES, vol.id)
        if rec is not None:
            self._destroy(rec.value, rec.revision)

    def _destroy(self, vol: VirtualVolume, rev: Revision) -> None:
        """The DELETING intent is made durable first; after the LUNs are freed, every
        record that goes (LUNs, pairs, the volume) goes in one `apply`."""
        if vol.state is not VolumeState.DELETING:
            vol = dataclasses.replace(vol, state=VolumeState.DELETING)
            rev = self._store.update(S.VOLUMES, vol, revision=rev)
        writes = [w for e in vol.extents if (w := self._free_extent(vol.id, e)) is not None]
        # pair dissolution (seed [0084]): the pair this volume is the copy of goes, and so do the
        # split pairs it is the source of (their copies stay, as static images)
        own = self._store.get(S.PAIRS, vol.id)
        if own is not None:
            tracking.stop(self._arrays, own.value)
            writes.append(S.Remove(table=S.PAIRS, key=vol.id))
        for rec in self._store.find(S.PAIRS, index="source", value=vol.id):
            writes.append(S.Remove(table=S.PAIRS, key=rec.value.id))
        self._store.apply([*writes, S.Remove(table=S.VOLUMES, key=vol.id)])
        log.info("%s %s (%s) deleted; %d LUN(s) freed", vol.kind.value, vol.id, vol.name, len(vol.extents))

    # -- expand --------------------------------------------------------------
    def expand(self, volume_id: str, *, required: int, limit: int) -> VirtualVolume:
        if not volume_id:
            raise errors.InvalidRequest("volume_id is required")
        size = choose_size(required=required, limit=limit)
        with self._locks.hold(volume_id):
            rec = self._store.get(S.VOLUMES, volume_id)
            if rec is None or rec.value.kind is not VolumeKind.VOLUME:
                raise errors.NotFound(f"volume {volume_id} does not exist")
            vol = rec.value
            if vol.state is not VolumeState.AVAILABLE:
                raise errors.PreconditionFailed(f"volume {volume_id} is {vol.state.value}")
            busy = self._busy(volume_id)
            if size > vol.size and busy:
                raise errors.PreconditionFailed(f"volume {volume_id} cannot grow now: {busy}")
            if size <= vol.size:
                return vol
            delta = size - vol.size
            place = P.placement(vol.parameters, vol.mutable_parameters)
            extents, grown_by = self._grow_last(vol, delta, place.max_extent)
            if grown_by < delta:
                added = self._append(vol, delta - grown_by, place)
                try:
                    for a in vol.attachments:  # nodes it is published to may reach the new LUNs
                        access.grant(self._arrays, self._store, node_id=a.node, extents=added)
                except BaseException:
                    self._free_extents(vol.id, added)
                    raise
                extents = extents + added
            grown = dataclasses.replace(vol, size=size, extents=extents)
            self._store.update(S.VOLUMES, grown, revision=rec.revision)
            log.info("volume %s grown to %d bytes (%d extents)", vol.id, size, len(extents))
            return grown

    def _grow_last(self, vol: VirtualVolume, delta: int, max_extent: int) -> tuple[tuple[Extent, ...], int]:
        """Grow the last LUN in place by as much of `delta` as its array allows."""
        last = vol.extents[-1]
        lrec = self._store.get(S.LUNS, f"{last.array}:{last.lun}")
        info = self._arrays.info(last.array)
        room = info.capacity_free - info.capacity_free % ALIGN
        if max_extent:
            room = min(room, max_extent - last.length)
        if (lrec is None or lrec.value.origin is not LunOrigin.PROVISIONED
                or Ability.GROW_LUN not in info.abilities or last.offset != 0
                or lrec.value.size != last.length or room <= 0):
            return vol.extents, 0
        by = min(delta, room)
        lun = self._arrays.driver(last.array).resize_lun(lun_id=last.lun, size=last.length + by)
        self._store.update(S.LUNS, dataclasses.replace(lrec.value, size=lun.size), revision=lrec.revision)
        return vol.extents[:-1] + (dataclasses.replace(last, length=last.length + by),), by

    def _append(self, vol: VirtualVolume, delta: int, place: P.Placement) -> tuple[Extent, ...]:
        topo = TopologyFilter([vol.topology]) if vol.topology else None
        infos = self._arrays.select(names=place.arrays, selector=place.selector, topology_ok=topo)
        cands = [Candidate(array=i.id, free=i.capacity_free, intact=self._intact_luns(i.id)) for i in infos]
        planned = plan_extents(size=delta, candidates=cands, layout=Layout.CONCAT, max_extent=place.max_extent,
                               lun_name=LunNamer(prefix=vol.id), first_index=_next_index(vol))
        new = _extents(planned)
        done: list[Extent] = []
        writes: list[S.Write] = []
        try:
            for e in new:
                w = self._claim_lun(vol, e)
                if w is not None:
                    writes.append(w)
                done.append(e)
            self._store.apply(writes)
        except errors.VirtvolError:
            self._free_extents(vol.id, done)
            raise
        return new

    # -- modify --------------------------------------------------------------
    def modify(self, volume_id: str, *, mutable: Mapping[str, str]) -> VirtualVolume:
        """ControllerModifyVolume: the volume is looked up first (NOT_FOUND before anything
        else); an empty map changes nothing and succeeds, as the reference driver does."""
        if not volume_id:
            raise errors.InvalidRequest("volume_id is required")
        with self._locks.hold(volume_id):
            rec = self._store.get(S.VOLUMES, volume_id)
            if rec is None or rec.value.kind is not VolumeKind.VOLUME:
                raise errors.NotFound(f"volume {volume_id} does not exist")
            if not mutable:
                return rec.value
            merged = {**rec.value.mutable_parameters, **mutable}
            P.placement(rec.value.parameters, merged)  # validates keys and values
            for name in P.user_parameters(mutable):
                if name == "arrays":
                    self._arrays.select(names=[a for a in mutable[name].split(",") if a.strip()])
            new = dataclasses.replace(rec.value, mutable_parameters=merged)
            self._store.update(S.VOLUMES, new, revision=rec.revision)
            return new

    # -- start-up recovery ------------------------------------------------
    def recover(self) -> None:
        """Roll back unfinished creates, finish unfinished deletes, remove orphans."""
        for rec in self._store.list(S.VOLUMES):
            vol = rec.value
            if vol.state is VolumeState.CREATING:
                log.warning("volume %s (%s): create did not finish before restart; rolling back", vol.id, vol.name)
                self._rollback(vol)
            elif vol.state is VolumeState.DELETING:
                log.warning("volume %s: delete did not finish before restart; finishing it", vol.id)
                self._destroy(vol, rec.revision)
        owned = {(e.array, e.lun) for r in self._store.list(S.VOLUMES) for e in r.value.extents}
        for aid in self._arrays.ids():
            for lun in self._arrays.driver(aid).list_luns():
                if lun.id.startswith(OWNED_PREFIXES) and (aid, lun.id) not in owned:
                    log.warning("array %s: LUN %s belongs to no volume; deleting it", aid, lun.id)
                    self._arrays.driver(aid).delete_lun(lun_id=lun.id)
                    self._store.delete(S.LUNS, f"{aid}:{lun.id}")
        for lrec in self._store.list(S.LUNS):
            lun = lrec.value
            if lun.origin is LunOrigin.PROVISIONED and (lun.array, lun.id) not in owned:
                self._store.delete(S.LUNS, lun.key)


def _extents(planned: Sequence[PlannedExtent]) -> tuple[Extent, ...]:
    return tuple(Extent(array=p.array, lun=p.lun, offset=0, length=p.length) for p in planned)


def _next_index(vol: VirtualVolume) -> int:
    own = [int(e.lun.rsplit("-", 1)[1]) for e in vol.extents
           if e.lun.startswith(vol.id + "-") and e.lun.rsplit("-", 1)[1].isdigit()]
    return max(own, default=-1) + 1


def _topology_of(group: Sequence[ArrayInfo]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in group:
        out.update(i.topology)
    return out


__all__ = ["VolumeService", "CreateVolume", "Page", "Condition", "Capacity", "volume_id_for", "LunId"]
