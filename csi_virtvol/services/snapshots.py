"""Snapshots, clones and restores: per-extent copy plans (seed drawings 9 and 10).

A snapshot is a virtual volume of kind SNAPSHOT whose extents are copies of
its source's extents, made by the cheapest means each extent allows
(copy/planner.py): an internal copy (reflink clone) where the source LUN's
array can, a host copy otherwise.  Its pair record (seed table 140) carries
the per-extent method, state and bytes copied, and the fence that keeps the
source still while the image is cut.

Order of work, each step idempotent so a restarted controller resumes it:
  1. record the target volume (state COPYING, extents with derived LUN names)
     and the pair (COPYING, per-extent rows);
  2. fence the source: an unpublished source has its LUNs access-prohibited (until a
     publish hands it to a node, which cuts it before writing it: cut.publish_mid_copy);
     make the fresh target LUNs;
  3. cut: a published source is cut live by its node's plugin (services/cut.py), and its
     internal clones are made and its remote copies started while its writes are held;
     the other sources' clones were made in 2;
  4. run the host and remote copies, checkpointing bytes done into the pair;
  5. lift the fence; the pair is SPLIT and the target AVAILABLE.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.backends.base import RemoteCopyCapable, require_internal_copy, require_remote_copy
from csi_virtvol.config import TOPOLOGY_NODE_KEY
from csi_virtvol.copy import checkpoint, planner
from csi_virtvol.model.allocation import ALIGN, Candidate, Layout, LunNamer, plan_extents
from csi_virtvol.model.array import Ability, LunOrigin, LunState
from csi_virtvol.model.ids import ArrayId, LunId, PairId, VolumeId
from csi_virtvol.model.pair import (CopyMethod, ExtentCopy, ExtentCopyState, Fence, Pair, PairState,
                                    PairTarget)
from csi_virtvol.model.volume import CopyRole, Extent, VirtualVolume, VolumeKind, VolumeState
from csi_virtvol import failpoints
from csi_virtvol.services import clonecost, cut, tracking, verify
from csi_virtvol.services.events import EventSink, LogEvents
from csi_virtvol.services import params as P
from csi_virtvol.services.arrays import ArrayPool, TopologyFilter
from csi_virtvol.copy.runner import CopyRunner, HostCopy
from csi_virtvol.services.locks import KeyedLocks
from csi_virtvol.services.volumes import CreateVolume, Page, VolumeService, volume_id_for
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)

SNAPSHOT_KEYS = {"arrays": "comma-separated arrays the snapshot's provisioned extents may use",
                 cut.STORE_KEY: "the most the copy-on-write store of a live cut may take on the node"}
ORPHAN_AGE = 60.0       # a target recorded this long ago with no pair was left by a crash
POLL = 0.2


def _polls(stop: threading.Event) -> Iterator[None]:
    """Wake a copy's follower soon after it starts (a resync of a few chunks is done in tens
    of milliseconds), then every POLL; ends when `stop` is set."""
    wait = 0.02
    while not stop.wait(wait):
        yield None
        wait = min(POLL, wait * 2)
# How long CreateSnapshot / CreateVolume-from-a-source wait for a copy before answering
# "not ready yet" (ready_to_use=false / ABORTED): the sidecars poll, so a gRPC thread is
# never held for long; an internal clone still answers ready at the first call.
AWAIT = 0.5
RESYNC_WAIT = 8.0       # `pair resync` (an operator's command) waits this long for a short resync


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    ready: bool
    bytes_done: int
    bytes_total: int
    methods: tuple[str, ...]
    message: str = ""


class SnapshotService:
    def __init__(self, *, store: StateStore, arrays: ArrayPool, locks: KeyedLocks,
                 volumes: VolumeService, runner: CopyRunner, wait: float = AWAIT,
                 bwlimit: Callable[[VirtualVolume], int] = lambda v: 0,
                 events: EventSink | None = None, is_leader: Callable[[], bool] = lambda: True) -> None:
        self._store = store
        self._arrays = arrays
        self._locks = locks
        self._volumes = volumes
        self._runner = runner
        self._wait = wait
        self._bwlimit = bwlimit
        self._events: EventSink = events or LogEvents()
        self._is_leader = is_leader
        self._workers: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._guard = threading.Lock()
        self._claimed: dict[str, int] = {}  # pairs a request is making or undoing: no reconcile worker for them
        self._changed = threading.Condition()  # notified when a copy ends, so waiters answer at once
        self._pending: Callable[[str], bool] = lambda vid: False  # set by services.groups
        volumes.set_cloner(self.create_from_source, self.busy_reason, self._discard_locked)

    # -- queries -----------------------------------------------------------
    def get(self, snapshot_id: str) -> VirtualVolume:
        return self._volumes.get(snapshot_id, kind=VolumeKind.SNAPSHOT)

    def progress(self, vol: VirtualVolume) -> Progress:
        rec = self._store.get(S.PAIRS, vol.id)
        if rec is None:
            return Progress(ready=vol.state is VolumeState.AVAILABLE, bytes_done=vol.size,
                            bytes_total=vol.size, methods=())
        t = rec.value.targets[0]
        methods = tuple(sorted({e.method.value for e in t.extents}))
        return Progress(ready=vol.state is VolumeState.AVAILABLE, bytes_done=t.bytes_done,
                        bytes_total=t.bytes_total, methods=methods, message=t.reason)

    def page(self, *, snapshot_id: str = "", source_volume_id: str = "", after: str = "",
             limit: int = 0) -> Page:
        if snapshot_id:
            try:
                snap = self.get(snapshot_id)
            except errors.NotFound:
                return Page(volumes=(), next_token="")
            if source_volume_id and snap.source_volume != source_volume_id:
                return Page(volumes=(), next_token="")
            return Page(volumes=(snap,), next_token="")
        if source_volume_id:
            found = sorted((r.value for r in self._store.find(S.VOLUMES, index="source", value=source_volume_id)
                            if r.value.kind is VolumeKind.SNAPSHOT and r.value.state is not VolumeState.DELETING),
                           key=lambda v: v.id)
            if after:
                found = [v for v in found if v.id > after]
            if limit and len(found) > limit:
                return Page(volumes=tuple(found[:limit]), next_token=found[limit - 1].id)
            return Page(volumes=tuple(found), next_token="")
        return self._volumes.page(after=after, limit=limit, kind=VolumeKind.SNAPSHOT)

    def busy_reason(self, volume_id: str) -> str:
        """Why `volume_id` cannot be deleted or resized now ("" if it can)."""
        for r in self._store.find(S.PAIRS, index="source", value=volume_id):
            if r.value.state in (PairState.COPYING, PairState.RESYNCING):
                return f"a copy of {volume_id} into {r.value.targets[0].volume} is in progress"
        return ""

    # -- CreateSnapshot ----------------------------------------------------
    def create_snapshot(self, *, name: str, source_volume_id: str,
                        parameters: Mapping[str, str]) -> tuple[VirtualVolume, Progress]:
        if not name:
            raise errors.InvalidRequest("name is required")
        if not source_volume_id:
            raise errors.InvalidRequest("source_volume_id is required")
        P.check_keys(parameters, SNAPSHOT_KEYS, what="snapshot parameter")
        sid = volume_id_for(name, VolumeKind.SNAPSHOT)
        with self._locks.hold(f"snapshot-name/{name}", sid):
            existing = self._store.get(S.VOLUMES, sid)
            if existing is not None and existing.value.source_volume != source_volume_id:
                raise errors.AlreadyExists(f"snapshot {name} exists for volume {existing.value.source_volume}")
            failed = self._store.get(S.PAIRS, sid)
            if existing is not None and failed is not None and failed.value.state is PairState.FAILED:
                log.warning("snapshot %s: the last attempt failed (%s); starting again", sid,
                            failed.value.targets[0].reason)
                self._discard(sid)
                existing = None
            elif existing is not None and failed is None and existing.value.state is VolumeState.COPYING:
                # under the name lock, a target without its pair is what a crash between the two
                # writes leaves (no one else writes it): start again instead of waiting for resume
                log.warning("snapshot %s: its copy was recorded but never started; starting again", sid)
                self._discard(sid)
                existing = None
            if existing is not None:
                if existing.value.state is VolumeState.COPYING:
                    self._ensure_worker(sid)
            else:
                source = self._volumes.get(source_volume_id)
                if source.state is not VolumeState.AVAILABLE:
                    raise errors.PreconditionFailed(f"volume {source_volume_id} is {source.state.value}")
                with self._claim(sid):
                    self._begin(target_id=sid, name=name, source=source, kind=VolumeKind.SNAPSHOT,
                                size=source.size, requested=_arrays(parameters), parameters=dict(parameters))
        snap = self._await(sid)
        return snap, self.progress(snap)

    def _await(self, vid: str, wait: float | None = None) -> VirtualVolume:
        """Wait a little for a short copy to finish, so small copies answer ready."""
        deadline = time.monotonic() + (self._wait if wait is None else wait)
        while True:
            rec = self._store.get(S.VOLUMES, vid)
            if rec is None:
                raise errors.NotFound(f"{vid} vanished while being copied")
            pair = self._store.get(S.PAIRS, vid)
            if pair is not None and pair.value.state is PairState.FAILED:
                raise errors.BackendError(f"copy into {vid} failed: {pair.value.targets[0].reason}")
            left = deadline - time.monotonic()
            if rec.value.state is not VolumeState.COPYING or left <= 0:
                return rec.value
            with self._changed:
                self._changed.wait(min(POLL, left))

    # -- clone / restore (CreateVolume with a content source) --------------
    def create_from_source(self, *, vid: VolumeId, req: CreateVolume, size: int,
                           place: P.Placement) -> VirtualVolume:
        kind, _, src_id = req.content_source.partition(":")
        if kind == "snapshot":
            try:
                source = self.get(src_id)
            except errors.NotFound as e:
                raise errors.NotFound(f"snapshot {src_id} does not exist") from e
            if source.state is not VolumeState.AVAILABLE:
                raise errors.PreconditionFailed(f"snapshot {src_id} is not ready yet")
        else:
            source = self._volumes.get(src_id)
            if source.state is not VolumeState.AVAILABLE:
                raise errors.PreconditionFailed(f"volume {src_id} is {source.state.value}")
        if size < source.size:
            raise errors.OutOfRange(f"the new volume ({size} bytes) is smaller than its source ({source.size})")
        with self._locks.hold(f"name/{req.name}", vid):
            existing = self._store.get(S.VOLUMES, vid)
            if existing is None:
                names = list(place.arrays)
                if place.selector:
                    names = [i.id for i in self._arrays.select(names=names, selector=place.selector)]
                with self._claim(vid):
                    self._begin(target_id=vid, name=req.name, source=source, kind=VolumeKind.VOLUME, size=size,
                                requested=names, parameters=dict(req.parameters),
                                mutable=dict(req.mutable_parameters), content_source=req.content_source)
            elif existing.value.state is VolumeState.COPYING:
                self._ensure_worker(vid)
        vol = self._await(vid)
        if vol.state is VolumeState.COPYING:
            prog = self.progress(vol)
            pct = 100 * prog.bytes_done // max(prog.bytes_total, 1)
            raise errors.OperationPending(
                f"volume {req.name} is being filled from {req.content_source}: {pct}% "
                f"({prog.bytes_done} of {prog.bytes_total} bytes, {', '.join(prog.methods)})")
        return vol

    # -- planning -----------------------------------------------------------
    def _reachable(self, a: ArrayId, b: ArrayId) -> bool:
        """Whether array `a` can push a LUN to array `b` by itself (remote copy)."""
        if a == b:
            return True
        try:
            driver = self._arrays.driver(a)
            target = self._arrays.info(b, fresh=False)
        except errors.VirtvolError:
            return False
        return isinstance(driver, RemoteCopyCapable) and driver.can_reach(target=target)

    def _begin(self, *, target_id: VolumeId, name: str, source: VirtualVolume, kind: VolumeKind, size: int,
               requested: list[str], parameters: dict[str, str], mutable: dict[str, str] | None = None,
               content_source: str = "", cut_later: bool = False) -> None:
        topo = TopologyFilter([source.topology]) if source.topology else None
        infos = self._arrays.select(names=requested, topology_ok=topo)
        if not infos:
            raise errors.CapacityExceeded("no array can hold the copy")
        abilities = {i.id: i.abilities for i in self._arrays.infos()}
        lun_sizes = {}
        for e in source.extents:
            lrec = self._store.get(S.LUNS, f"{e.array}:{e.lun}")
            if lrec is not None:
                lun_sizes[lrec.value.key] = lrec.value.size
        placement = planner.place_targets(
            source=source, abilities=abilities, reachable=self._reachable,
            requested=[i.id for i in infos], free={i.id: i.capacity_free - i.capacity_free % ALIGN for i in infos},
            lun_sizes=lun_sizes, clone_costs=clonecost.clone_costs(self._arrays, source, abilities=abilities))
        if placement.declined:
            log.info("%s: %s; copying those instead", target_id, clonecost.describe_declined(placement.declined))
        names = self._slot_names(target_id, placement)
        extents = planner.target_extents(placement, luns=names)
        if size > source.size:  # restore or clone into a larger volume: fresh zeroed room at the end
            cands = [Candidate(array=i.id, free=i.capacity_free) for i in infos]
            extra = plan_extents(size=size - source.size, candidates=cands, layout=Layout.CONCAT,
                                 lun_name=LunNamer(prefix=target_id), first_index=len(placement.slots))
            extents += tuple(Extent(array=p.array, lun=p.lun, offset=0, length=p.length) for p in extra)
        target = VirtualVolume(
            id=target_id, name=name, size=size, extents=extents, kind=kind, state=VolumeState.COPYING,
            address=f"virtvol://{target_id}", parameters=parameters, mutable_parameters=mutable or {},
            content_source=content_source,
            source_volume=source.id if kind is VolumeKind.SNAPSHOT else "",
            role=CopyRole.COPY, topology=dict(source.topology), created_at=time.time())
        plan = planner.plan_copy(source=source, targets=[_head(target, source.size)], abilities=abilities,
                                 reachable=self._reachable, clones=planner.clone_map(placement, luns=names),
                                 lun_sizes=lun_sizes)
        pair = Pair(id=PairId(target_id), source=source.id, targets=(PairTarget(
            volume=target_id, state=PairState.COPYING, extents=plan.extent_copies(target_id),
            started_at=time.time()),))
        # intent first: a crash from here on is resumed (or cleaned up) from these records
        self._store.create(S.VOLUMES, target)
        failpoints.hit("copy-recorded-volume")
        self._store.create(S.PAIRS, pair)
        failpoints.hit("copy-recorded-pair")
        how = ", ".join(f"{m.value} {n >> 20} MiB" for m, n in plan.bytes_by_method().items())
        log.info("%s %s: copying %s (%s) by %s", kind.value, target_id, source.id, source.name, how)
        self._events.emit(parameters=parameters, reason="CopyStarted",
                          message=f"copying {source.kind.value} {source.id} into {target_id}: {how}")
        if cut_later:
            return
        try:
            self._cut(pair.id)
        except errors.VirtvolError as e:
            log.warning("%s %s: could not cut the image: %s; undoing", kind.value, target_id, e)
            self._events.emit(parameters=parameters, reason="CopyFailed", warning=True,
                              message=f"could not cut the image of {source.id} for {target_id}: {e}")
            self._discard(target_id)
            raise
        self._ensure_worker(target_id)

    @contextlib.contextmanager
    def _claim(self, vid: str) -> Iterator[None]:
        """While a request makes or undoes pair `vid`, the reconcile loop starts no worker on it
        (a worker on a half-undone pair would make its LUNs again, without the pair's clones)."""
        with self._guard:
            self._claimed[vid] = self._claimed.get(vid, 0) + 1
        try:
            yield
        finally:
            with self._guard:
                self._claimed[vid] -= 1
                if not self._claimed[vid]:
                    del self._claimed[vid]

    @staticmethod
    def _slot_names(target_id: VolumeId, placement: planner.Placement) -> list[LunId]:
        names: list[LunId] = []
        first: dict[tuple[ArrayId, LunId], LunId] = {}
        for i, slot in enumerate(placement.slots):
            name = LunId(f"{target_id}-{i}")
            if slot.kind is planner.SlotKind.CLONE and slot.source_lun is not None:
                name = first.setdefault((slot.array, slot.source_lun), name)
            names.append(name)
        return names

    # -- the cut: fence the source, make the target LUNs -------------------
    def _cut(self, pair_id: str) -> None:
        prepared = self._prepare(pair_id)
        if prepared is not None:
            cut.cut_at_one_instant(self._store, [prepared.member], while_held=prepared.at_instant)
            self._mark(prepared)

    def _prepare(self, pair_id: str, *, group: bool = False) -> cut.Prepared | None:
        """All a cut of `pair_id` needs before its instant (None: it is cut already).  The
        fresh target LUNs are made, remote copies left by an earlier attempt cancelled, and the
        tracking started, before any write is held.  A source nothing writes needs no hold: an
        unpublished one is fenced (LUNs access-prohibited), a snapshot never changes, and one
        reflink clone alone is atomic (not in a `group`, whose instant must cover all); its
        clones are made now.  A source in use is cut live on its node (the member's node), and
        only its clones and remote copy starts are made at the instant (`at_instant`)."""
        rec = self._store.get(S.PAIRS, pair_id)
        if rec is None or rec.value.cut_at:
            return None
        pair = rec.value
        source = self._volumes.get(pair.source, kind=self._kind_of(pair.source))
        target = self._store_volume(pair.targets[0].volume)
        rows = pair.targets[0].extents
        attached = source.attachments
        node = ""
        if pair.fence is Fence.CUT_ON_STAGE:
            pass  # fenced, then published (cut.publish_mid_copy): nothing wrote it yet
        elif source.kind is VolumeKind.SNAPSHOT:
            self._set_fence(pair_id, Fence.NONE)  # snapshots never change
        elif not attached:
            self._prohibit(pair_id, source.id)
        elif len(source.extents) == 1 and all(r.method is CopyMethod.INTERNAL for r in rows) and not group:
            self._set_fence(pair_id, Fence.NONE, node=attached[0].node)  # one reflink clone is atomic
        else:
            node = attached[0].node  # a live cut: writes held for an instant (services/cut.py)
        failpoints.hit("copy-fenced")
        steps = {st.index: st for st in self._steps(source, target)}
        remote = [r for r in rows if r.method is CopyMethod.REMOTE]
        for r in remote:  # an earlier attempt's: of another instant
            self._cancel_remote(r, f"{pair_id}-{r.index}")
        self._make_luns(source, target, clones=not node)
        tracking.start(self._arrays, pair)  # before the instant: every write after it is tracked
        member = cut.Member(pair=pair.id, node=node)
        if not node:
            return cut.Prepared(member=member)
        resync = pair.targets[0].state is PairState.RESYNCING
        starts = [self._remote_start(pair_id, r, steps[r.index], resync=resync)[1] for r in remote]
        if not starts and not any(r.method is CopyMethod.INTERNAL for r in rows):
            return cut.Prepared(member=member)

        def at_instant() -> None:
            self._make_luns(source, target, fresh=False)
            for start in starts:
                start()
        return cut.Prepared(member=member, at_instant=at_instant)

    def _mark(self, prepared: cut.Prepared) -> None:
        """The pair is cut: its instant is the node's cut (a live one), or now."""
        failpoints.hit("copy-luns-made")
        live = bool(prepared.member.node)
        self._update_pair(prepared.member.pair, lambda p: dataclasses.replace(
            p, cut_at=p.cut_time if live and p.cut_time else time.time()))

    def _prohibit(self, pair_id: str, source_id: str) -> Pair:
        """Fence an unpublished source: its LUNs access-prohibited, the pair PROHIBITED.  Under
        the source's lock, which ControllerPublish holds from its check to its attachment, so a
        publish either comes first (then: try again, as a live cut) or sees the fence (and has
        the node cut the source before writing it: cut.publish_mid_copy)."""
        deadline = time.monotonic() + 5.0
        while True:
            try:
                with self._locks.hold(source_id):
                    source = self._store_volume(source_id)
                    if source.attachments:
                        raise errors.OperationPending(f"volume {source_id} was published meanwhile; try again")
                    pair = self._set_fence(pair_id, Fence.PROHIBITED)
                    self._set_lun_states(source, LunState.ACCESS_PROHIBITED)
                    return pair
            except errors.OperationPending:
                if time.monotonic() > deadline or self._store_volume(source_id).attachments:
                    raise
                time.sleep(POLL / 4)

    def _kind_of(self, vid: str) -> VolumeKind:
        return VolumeKind.SNAPSHOT if vid.startswith("vs-") else VolumeKind.VOLUME

    def _store_volume(self, vid: str) -> VirtualVolume:
        rec = self._store.get(S.VOLUMES, vid)
        if rec is None:
            raise errors.NotFound(f"{vid} does not exist")
        return rec.value

    def _set_fence(self, pair_id: str, fence: Fence, *, node: str = "", message: str = "") -> Pair:
        def change(p: Pair) -> Pair:
            return dataclasses.replace(p, fence=fence, fence_node=node or p.fence_node, fence_message=message)
        return self._update_pair(pair_id, change)

    def _update_pair(self, pair_id: str, change: Callable[[Pair], Pair]) -> Pair:
        for _ in range(20):
            rec = self._store.get(S.PAIRS, pair_id)
            if rec is None:
                raise errors.NotFound(f"pair {pair_id} does not exist")
            new = change(rec.value)
            if new == rec.value:
                return new
            try:
                self._store.update(S.PAIRS, new, revision=rec.revision)
                return new
            except errors.Conflict:
                continue
        raise errors.Conflict(f"pair {pair_id} kept changing underneath")

    def _set_lun_states(self, vol: VirtualVolume, state: LunState) -> None:
        for e in vol.extents:
            key = f"{e.array}:{e.lun}"
            for _ in range(20):
                rec = self._store.get(S.LUNS, key)
                if rec is None or rec.value.state is state:
                    break
                try:
                    self._store.update(S.LUNS, dataclasses.replace(rec.value, state=state), revision=rec.revision)
                    break
                except errors.Conflict:
                    continue

    def _make_luns(self, source: VirtualVolume, target: VirtualVolume, *, fresh: bool = True,
                   clones: bool = True) -> None:
        """Fresh LUNs for the slots copied from the source (`fresh`: made before the cut, so
        the writes are held the shortest time) and clones for the INTERNAL slots (`clones`: at
        the instant); idempotent.  A clone found is always made again: it belongs to an
        earlier instant (the pair's last copy, for a resync; a cut made again after a crash,
        whose writes were let go in between; a clone is never updated in place)."""
        prec = self._store.get(S.PAIRS, target.id)
        if prec is None:  # undone meanwhile: without the pair, clones would be made as full LUNs
            raise errors.NotFound(f"pair {target.id} is gone")
        src_luns = {(e.array, e.lun) for e in source.extents}
        made: set[tuple[ArrayId, LunId]] = set()
        for i, e in enumerate(target.extents):
            if (e.array, e.lun) in made:
                continue
            made.add((e.array, e.lun))
            clone_of = self._clone_source(source, target, i)
            is_clone = clone_of is not None and (e.array, clone_of) in src_luns
            if not (clones if is_clone else fresh):
                continue
            driver = self._arrays.driver(e.array)
            if is_clone:
                assert clone_of is not None
                copier = require_internal_copy(driver, self._arrays.info(e.array, fresh=False).abilities)
                driver.delete_lun(lun_id=e.lun)
                lun = copier.copy_lun_internal(source=clone_of, name=e.lun)
            else:
                lun = driver.create_lun(name=e.lun, size=e.length if e.offset == 0 else e.offset + e.length)
            claimed = dataclasses.replace(lun, state=LunState.IN_USE, origin=LunOrigin.PROVISIONED,
                                          volume=target.id)
            S.upsert(self._store, S.LUNS, claimed)

    def _clone_source(self, source: VirtualVolume, target: VirtualVolume, index: int) -> LunId | None:
        """The source LUN whose clone target extent `index` is (by the pair's recorded methods)."""
        pair = self._store.get(S.PAIRS, target.id)
        if pair is None:
            return None
        steps = self._steps(source, target)
        rows = {r.index: r for r in pair.value.targets[0].extents}
        e = target.extents[index]
        for step in steps:
            if (step.target_extent.array, step.target_extent.lun) == (e.array, e.lun):
                row = rows.get(step.index)
                if row is not None and row.method is CopyMethod.INTERNAL:
                    return step.source.lun
        return None

    def _steps(self, source: VirtualVolume, target: VirtualVolume) -> tuple[planner.CopyStep, ...]:
        """The copy's pieces, recomputed from the two volumes' extents (deterministic)."""
        plan = planner.plan_copy(source=source, targets=[_head(target, source.size)], abilities={},
                                 reachable=lambda a, b: False)
        return plan.for_target(target.id)

    # -- the worker: host copies with checkpoints ----------------------------
    def _ensure_worker(self, vid: str, *, resuming: bool = False) -> None:
        if not self._is_leader():
            return  # the elected controller's reconcile loop runs it
        if self._pending(vid):
            return  # a member of a group still being cut: the group cuts and starts it
        with self._guard:
            if resuming and vid in self._claimed:
                return
            w = self._workers.get(vid)
            if w is not None and w[0].is_alive():
                return
            stop = threading.Event()
            t = threading.Thread(target=self._work, args=(vid, stop), name=f"copy-{vid[:12]}", daemon=True)
            self._workers[vid] = (t, stop)
            t.start()

    def _work(self, vid: str, stop: threading.Event) -> None:
        try:
            self._cut(vid)
            self._copy(vid, stop)
        except errors.VirtvolError as e:
            if stop.is_set():
                return
            log.error("copy into %s failed: %s", vid, e)
            self._fail(vid, str(e))
        except Exception as e:  # keep the worker's failure in the record, not only in a log
            log.exception("copy into %s crashed", vid)
            self._fail(vid, f"{type(e).__name__}: {e}")
        finally:
            with self._changed:
                self._changed.notify_all()

    def _switch_to_view(self, vid: str, pair: Pair) -> Pair:
        """The source, published mid-copy, was cut by its node, which waits to use it until no
        copy reads its LUNs directly (cut.publish_mid_copy): stop those copies (their checkpoints
        stay; they resume from the cut's view), then let the node go."""
        if not cut.awaits_switch(pair):
            return pair
        rows = pair.targets[0].extents
        if any(r.method is CopyMethod.REMOTE and r.state is not ExtentCopyState.DONE for r in rows):
            return pair  # the source array reads the LUNs itself: the volume waits for those
        for r in rows:
            if r.method is CopyMethod.HOST and r.state is not ExtentCopyState.DONE:
                self._runner.stop(f"{vid}-{r.index}")
        failpoints.hit("copy-switching")
        pair = cut.let_go(self._store, pair)
        log.info("pair %s: the copy now reads %s on %s; the source is in use there", vid, pair.cut_view,
                 pair.fence_node)
        return pair

    def _copy(self, vid: str, stop: threading.Event) -> None:
        pair = self._switch_to_view(vid, self._update_pair(vid, lambda p: p))
        if pair.fence is Fence.REFUSED:
            raise errors.PreconditionFailed(
                f"the source's node stopped holding its writes before the image was complete: {pair.fence_message}")
        source = self._store_volume(pair.source)
        target = self._store_volume(vid)
        steps = {s.index: s for s in self._steps(source, target)}
        for row in pair.targets[0].extents:
            if row.state is ExtentCopyState.DONE:
                if row.method is CopyMethod.HOST:  # a controller stopped between done and its tidy-up
                    self._runner.finished(f"{vid}-{row.index}")
                continue
            if stop.is_set():
                return
            if row.method is CopyMethod.INTERNAL:  # the clone was made at the cut
                self._set_row(vid, row.index, state=ExtentCopyState.DONE, done=row.bytes_total)
                continue
            step = steps[row.index]
            resync = pair.targets[0].state is PairState.RESYNCING
            if row.method is CopyMethod.REMOTE:
                self._remote_copy(vid, row, step, stop, resync=resync)
            else:
                self._host_copy(vid, row, step, stop, source, only_changed=resync, cut_at=pair.cut_at)
        if stop.is_set():
            return
        self._finish(vid)

    def _host_copy(self, vid: str, row: ExtentCopy, step: planner.CopyStep, stop: threading.Event,
                   source: VirtualVolume, *, only_changed: bool = False, cut_at: float = 0.0) -> None:
        src = self._arrays.driver(step.source.array).open_path(lun_id=step.source.lun)
        dst = self._arrays.driver(step.target_extent.array).open_path(lun_id=step.target_extent.lun)
        job = f"{vid}-{row.index}"
        lun = src

        def where(pair: Pair) -> tuple[str, int, str, str]:
            return cut.source_for(pair, volume_offset=step.offset) or (lun, step.source.offset,
                                                                       self._copy_node(step), "")
        src, src_offset, node, changed = where(self._update_pair(vid, lambda p: p))
        recopies = 0

        def attempt() -> HostCopy:  # a checkpoint belongs to one target, one cut and one attempt
            ident = checkpoint.identity(pair=vid, target=f"{step.target_extent.array}:{step.target_extent.lun}",
                                        cut_at=cut_at, attempt=recopies)
            return HostCopy(job=job, pair=vid, index=row.index, node=node, changed_map=changed,
                            src=src, src_offset=src_offset, dst=dst,
                            dst_offset=step.target_extent.offset, length=step.length,
                            bwlimit=self._bwlimit(source), only_changed=only_changed,
                            # a snapshot is never written by anyone else, so a manifest of its pages
                            # stays true: later resyncs then read only the source
                            checksums=only_changed and vid.startswith("vs-"),
                            checkpoint_id=ident, verify=True)
        copy = attempt()
        attempts = 0
        self._set_row(vid, row.index, state=ExtentCopyState.COPYING)
        failpoints.hit("copy-host-starting")
        self._runner.start(copy)
        failpoints.hit("copy-host-started")
        last = -1
        for _ in _polls(stop):
            cut.check(self._store, vid)
            now = where(self._switch_to_view(vid, self._update_pair(vid, lambda p: p)))
            if now != (src, src_offset, node, changed):  # cut on its node mid-copy: read the view
                self._runner.stop(job)
                src, src_offset, node, changed = now
                copy = attempt()
                self._runner.start(copy)
                log.info("host copy %s resumes from its checkpoint, reading %s", job, src)
                continue
            st = self._runner.poll(job)
            if st.bytes_done != last:
                last = st.bytes_done
                self._set_row(vid, row.index, done=min(st.bytes_done, row.bytes_total))
                if st.bytes_done:
                    failpoints.hit("copy-checkpointed")
            if st.done or st.mismatch:
                failpoints.hit("copy-host-ended")
                verdict = verify.judge(st, length=step.length, checkpoint_id=copy.checkpoint_id)
                if verdict.ok:
                    failpoints.hit("copy-verified")
                    self._set_row(vid, row.index, state=ExtentCopyState.DONE, done=row.bytes_total,
                                  written=st.bytes_written, verified=(verdict.method, verdict.result))
                    failpoints.hit("copy-host-done")
                    self._runner.finished(job)
                    return
                self._set_row(vid, row.index, state=ExtentCopyState.COPYING, done=0,
                              verified=(verdict.method, verdict.result))
                self._runner.forget(job)
                recopies += 1
                if recopies > verify.MAX_RECOPIES:
                    raise errors.BackendError(f"host copy of extent {row.index} did not verify: {verdict.result}")
                log.warning("host copy %s did not verify (%s: %s); copying it again from the start",
                            job, verdict.method, verdict.result)
                copy, last = attempt(), -1
                self._runner.start(copy)
                continue
            if not st.running:
                attempts += 1
                if attempts > 3:
                    raise errors.BackendError(f"host copy of extent {row.index} failed: {st.message}")
                log.warning("host copy %s stopped (%s); restarting from its checkpoint", job, st.message)
                self._runner.start(copy)
        self._runner.cancel(job)

    def _remote_start(self, vid: str, row: ExtentCopy, step: planner.CopyStep, *,
                      resync: bool) -> tuple[RemoteCopyCapable, Callable[[], None]]:
        """The source array of `row`, and a start of its push of the source LUN into the target
        LUN (seed 330; idempotent by job name): point-in-time from the moment it starts, so a
        source in use has it started at the cut, its writes held.  A resync pushes only what
        the pair's tracking saw written since the last copy."""
        src_array = step.source.array
        pusher = require_remote_copy(self._arrays.driver(src_array),
                                     self._arrays.info(src_array, fresh=False).abilities)
        target = self._arrays.driver(step.target_extent.array).get_lun(lun_id=step.target_extent.lun)
        if target is None:
            raise errors.NotFound(f"target LUN {step.target_extent.array}/{step.target_extent.lun} is gone")
        job = f"{vid}-{row.index}"
        since = tracking.name_for(vid) if resync and tracking.tracker(self._arrays, src_array) is not None else ""

        def start() -> None:
            try:
                pusher.start_remote_copy(source=step.source.lun, target_address=target.address, job=job,
                                         since=since)
            except errors.NotFound:
                if not since:
                    raise
                log.warning("pair %s: tracking of %s is gone; pushing it whole", vid, step.source.lun)
                pusher.start_remote_copy(source=step.source.lun, target_address=target.address, job=job)
        return pusher, start

    def _remote_copy(self, vid: str, row: ExtentCopy, step: planner.CopyStep, stop: threading.Event,
                     *, resync: bool) -> None:
        """Follow the source array's push of `row`.  It is started here when nothing writes
        the source (it may be started again if the array loses it); a source cut live had it
        started at the cut, and a lost one fails the copy: pushed again, it would carry writes
        made after the cut."""
        pusher, start = self._remote_start(vid, row, step, resync=resync)
        job = f"{vid}-{row.index}"
        self._set_row(vid, row.index, state=ExtentCopyState.COPYING)
        failpoints.hit("copy-remote-starting")

        def still() -> bool:
            pair = self._update_pair(vid, lambda p: p)
            return cut.luns_still(pair, snapshot_source=self._kind_of(pair.source) is VolumeKind.SNAPSHOT)
        if still():
            start()
        failpoints.hit("copy-remote-started")
        attempts = 0
        for _ in _polls(stop):
            try:
                st = pusher.remote_copy_progress(job=job)
            except errors.NotFound:  # the array forgot the job (restart)
                if not still():
                    raise errors.BackendError(
                        f"the remote copy of extent {row.index} started at the cut is gone from array "
                        f"{step.source.array} (restarted?); the source has been written since, so it is "
                        "not pushed again: take the snapshot again") from None
                attempts += 1
                if attempts > 3:
                    raise errors.BackendError(f"remote copy of extent {row.index} keeps vanishing") from None
                start()
                continue
            if st.done and st.error:
                raise errors.BackendError(f"remote copy of extent {row.index} failed: {st.error}")
            if st.done:
                self._set_row(vid, row.index, state=ExtentCopyState.DONE, done=row.bytes_total,
                              written=st.bytes_total)
                return
            if st.bytes_total:
                self._set_row(vid, row.index, done=row.bytes_total * st.bytes_done // st.bytes_total)
        # stopped (the controller goes): the array carries on, the next worker follows it; a
        # discard cancels it (_cancel_remote)

    def _copy_node(self, step: planner.CopyStep) -> str:
        """A node that reaches both arrays: the one they are pinned to, if any."""
        nodes = {self._arrays.spec(a).topology.get(TOPOLOGY_NODE_KEY, "")
                 for a in (step.source.array, step.target_extent.array)} - {""}
        if len(nodes) > 1:
            raise errors.UnsupportedCapability(
                f"no node reaches both array {step.source.array} and array {step.target_extent.array}")
        return nodes.pop() if nodes else ""

    def _set_row(self, vid: str, index: int, *, state: ExtentCopyState | None = None, done: int | None = None,
                 written: int = -1, verified: tuple[str, str] | None = None) -> None:
        def change(p: Pair) -> Pair:
            t = p.targets[0]
            method, result = verified or ("", "")
            rows = tuple(dataclasses.replace(r, state=state or r.state,
                                             bytes_done=r.bytes_done if done is None else done,
                                             bytes_written=r.bytes_written if written < 0 else written,
                                             verify_method=method if verified else r.verify_method,
                                             verify_result=result if verified else r.verify_result)
                         if r.index == index else r for r in t.extents)
            return dataclasses.replace(p, targets=(dataclasses.replace(t, extents=rows),))
        self._update_pair(vid, change)

    def _release(self, pair: Pair) -> None:
        others = [r.value for r in self._store.find(S.PAIRS, index="source", value=pair.source)
                  if r.value.id != pair.id and r.value.fence is Fence.PROHIBITED
                  and r.value.state in (PairState.COPYING, PairState.RESYNCING)]
        if pair.fence is Fence.PROHIBITED and not others:  # the last copy reading the source lifts it
            try:
                self._set_lun_states(self._store_volume(pair.source), LunState.IN_USE)
            except errors.NotFound:
                pass
        if pair.fence in (Fence.PROHIBITED, Fence.FREEZE_REQUESTED, Fence.FROZEN, *cut.LIVE):
            self._set_fence(pair.id, Fence.RELEASED)

    def _finish(self, vid: str) -> None:
        failpoints.hit("copy-finishing")
        pair = self._update_pair(vid, lambda p: p)
        self._release(pair)
        failpoints.hit("copy-released")

        def split(p: Pair) -> Pair:
            t = dataclasses.replace(p.targets[0], state=PairState.SPLIT, ended_at=time.time())
            return dataclasses.replace(p, targets=(t,))
        self._update_pair(vid, split)
        rec = self._store.get(S.VOLUMES, vid)
        if rec is not None and rec.value.state is VolumeState.COPYING:
            self._store.update(S.VOLUMES, dataclasses.replace(rec.value, state=VolumeState.AVAILABLE),
                               revision=rec.revision)
        log.info("copy into %s complete", vid)
        if rec is not None:
            self._events.emit(parameters=rec.value.parameters, reason="CopyComplete",
                              message=f"{vid} is a complete point-in-time copy of {pair.source}")

    def _fail(self, vid: str, reason: str) -> None:
        def failed(p: Pair) -> Pair:
            t = dataclasses.replace(p.targets[0], state=PairState.FAILED, reason=reason, ended_at=time.time())
            return dataclasses.replace(p, targets=(t,))
        # failed first, then the source let go: stopped in between, a pair still in flight would be
        # resumed over a source that may be written meanwhile; a failed one is only ever undone
        try:
            pair = self._update_pair(vid, failed)
        except errors.NotFound:
            return
        self._release(pair)
        rec = self._store.get(S.VOLUMES, vid)
        if rec is not None:
            self._events.emit(parameters=rec.value.parameters, reason="CopyFailed",
                              message=f"copying {pair.source} into {vid} failed: {reason}", warning=True)

    # -- resync (seed [0090]) ------------------------------------------------------
    def pairs(self, *, source: str = "") -> list[Pair]:
        recs = self._store.find(S.PAIRS, index="source", value=source) if source else self._store.list(S.PAIRS)
        return [r.value for r in recs]

    def target_luns(self, pair: Pair) -> dict[int, str]:
        """Row index -> the "array:lun" its piece is written to, from the two volumes'
        extents (as the copy computes them); empty once either volume is gone."""
        source = self._store.get(S.VOLUMES, pair.source)
        target = self._store.get(S.VOLUMES, pair.targets[0].volume)
        if source is None or target is None:
            return {}
        return {s.index: f"{s.target_extent.array}:{s.target_extent.lun}"
                for s in self._steps(source.value, target.value)}

    def resync(self, target_id: str) -> Pair:
        """Bring a split copy up to the source's present content, writing only what
        changed: clones are made again (constant time); host-copied extents are
        compared piece by piece and only differing pieces are written."""
        if not target_id:
            raise errors.InvalidRequest("target is required")
        with self._locks.hold(target_id):
            rec = self._store.get(S.PAIRS, target_id)
            if rec is None:
                raise errors.NotFound(f"no pair has target {target_id}")
            pair = rec.value
            if pair.state in (PairState.COPYING, PairState.RESYNCING):
                return pair  # already on its way
            if pair.state is PairState.FAILED:
                raise errors.PreconditionFailed(f"pair {target_id} failed ({pair.targets[0].reason}); "
                                                "delete its target and copy again")
            target = self._store_volume(target_id)
            if target.attachments:
                raise errors.PreconditionFailed(f"{target_id} is published; unpublish it before a resync")
            source = self._store_volume(pair.source)
            if source.state is not VolumeState.AVAILABLE or source.size != _head(target, source.size).size \
                    or target.size < source.size:
                raise errors.PreconditionFailed(f"source {pair.source} changed shape; copy it again instead")
            t = pair.targets[0]
            rows = tuple(dataclasses.replace(r, state=ExtentCopyState.PENDING, bytes_done=0, bytes_written=0)
                         for r in t.extents)
            fresh = dataclasses.replace(pair, fence=Fence.NONE, fence_node="", fence_message="", cut_at=0.0,
                                        since_cut=pair.cut_id if pair.fence is not Fence.REFUSED else "",
                                        targets=(dataclasses.replace(t, state=PairState.RESYNCING, extents=rows,
                                                                     started_at=time.time(), ended_at=0.0,
                                                                     reason=""),))
            # claimed until it is cut: the reconcile loop would otherwise start a worker on the
            # resyncing pair, whose own cut races this one (two cuts of one resync)
            with self._claim(target_id):
                self._store.update(S.PAIRS, fresh, revision=rec.revision)
                vrec = self._store.get(S.VOLUMES, target_id)
                if vrec is not None:
                    self._store.update(S.VOLUMES, dataclasses.replace(vrec.value, state=VolumeState.COPYING),
                                       revision=vrec.revision)
                log.info("pair %s: resync from %s", target_id, pair.source)
                try:
                    self._cut(target_id)
                except errors.VirtvolError as e:
                    self._fail(target_id, f"resync could not cut the image: {e}")
                    raise
            self._ensure_worker(target_id)
        self._await(target_id, RESYNC_WAIT)
        return self._update_pair(target_id, lambda p: p)

    # -- DeleteSnapshot, and undoing a copy -----------------------------------
    def delete_snapshot(self, snapshot_id: str) -> None:
        if not snapshot_id:
            raise errors.InvalidRequest("snapshot_id is required")
        with self._locks.hold(snapshot_id):
            rec = self._store.get(S.VOLUMES, snapshot_id)
            if rec is None or rec.value.kind is not VolumeKind.SNAPSHOT:
                return
            self._discard(snapshot_id)

    def _stop_worker(self, vid: str) -> None:
        with self._guard:
            w = self._workers.pop(vid, None)
        if w is not None:
            w[1].set()
            w[0].join(timeout=60)

    def _discard(self, vid: str) -> None:
        """Cancel any copy, lift the fence, free every LUN, drop the records."""
        with self._claim(vid):
            self._discard_claimed(vid)

    def _discard_claimed(self, vid: str) -> None:
        self._stop_worker(vid)
        pair = self._store.get(S.PAIRS, vid)
        if pair is not None:
            for row in pair.value.targets[0].extents:
                if row.method is CopyMethod.REMOTE:
                    self._cancel_remote(row, f"{vid}-{row.index}")
                else:
                    self._runner.forget(f"{vid}-{row.index}")
            self._release(pair.value)
        vol = self._store.get(S.VOLUMES, vid)
        if vol is not None:
            self._volumes.destroy(vol.value)
        self._store.delete(S.PAIRS, vid)

    def _cancel_remote(self, row: ExtentCopy, job: str) -> None:
        array = ArrayId(row.source_lun.partition(":")[0])
        try:
            driver = self._arrays.driver(array)
        except errors.VirtvolError:
            return
        if isinstance(driver, RemoteCopyCapable):
            try:
                driver.cancel_remote_copy(job=job)
            except errors.VirtvolError as e:
                log.warning("could not cancel remote copy %s: %s", job, e)

    def _discard_locked(self, vid: str) -> None:
        """DeleteVolume of a clone still being filled."""
        with self._locks.hold(vid):
            self._discard(vid)

    # -- members of a group snapshot (services/groups.py holds and cuts them together) --
    def set_group_guard(self, pending: Callable[[str], bool]) -> None:
        """`pending(vid)`: vid belongs to a group still being cut, so no worker may cut it alone."""
        self._pending = pending

    def record_member(self, *, snapshot_id: VolumeId, name: str, source: VirtualVolume,
                      parameters: Mapping[str, str]) -> None:
        """Record a snapshot's target and pair, planned as CreateSnapshot plans it, but not cut."""
        P.check_keys(parameters, SNAPSHOT_KEYS, what="group snapshot parameter")
        self._begin(target_id=snapshot_id, name=name, source=source, kind=VolumeKind.SNAPSHOT,
                    size=source.size, requested=_arrays(parameters), parameters=dict(parameters),
                    cut_later=True)

    def prepare_member(self, snapshot_id: str) -> cut.Prepared | None:
        """Make ready to cut the member: `_prepare`, holding even a source whose image alone
        would be atomic (None: it is cut already)."""
        return self._prepare(snapshot_id, group=True)

    def mark_member(self, prepared: cut.Prepared) -> None:
        """The member is cut (services/groups.cut_group): record its instant."""
        self._mark(prepared)

    def start_member(self, snapshot_id: str) -> None:
        """Run the member's copies; its source is let go when they end."""
        self._ensure_worker(snapshot_id)

    def discard_member(self, snapshot_id: str) -> None:
        """Undo a member entirely: copies, fence, LUNs, records."""
        self._discard(snapshot_id)

    def failure(self, snapshot_id: str) -> str:
        """Why the member's copy failed ("" unless it did)."""
        rec = self._store.get(S.PAIRS, snapshot_id)
        if rec is None or rec.value.state is not PairState.FAILED:
            return ""
        return rec.value.targets[0].reason or "failed"

    # -- start-up ---------------------------------------------------------
    def resume(self, *, orphan_age: float = ORPHAN_AGE) -> None:
        """After a restart: finish every copy in flight; drop targets whose pair was never written."""
        pairs = {str(r.value.id) for r in self._store.list(S.PAIRS)}
        for vrec in self._store.list(S.VOLUMES):
            stale = time.time() - vrec.value.created_at >= orphan_age
            if vrec.value.state is VolumeState.COPYING and vrec.value.id not in pairs and stale:
                log.warning("%s: a copy was recorded but never started; removing it", vrec.value.id)
                self._volumes.destroy(vrec.value)
        for rec in self._store.list(S.PAIRS):
            pair = rec.value
            if pair.state in (PairState.COPYING, PairState.RESYNCING):
                target = self._store.get(S.VOLUMES, pair.targets[0].volume)
                if target is None:
                    self._release(pair)
                    self._store.delete(S.PAIRS, pair.id)
                    continue
                with self._guard:
                    if pair.id in self._claimed:
                        continue  # a request is making or undoing it
                    running = pair.id in self._workers and self._workers[pair.id][0].is_alive()
                if not running:
                    log.info("resuming copy into %s", pair.id)
                    self._ensure_worker(pair.id, resuming=True)

    def reconcile(self, stop: threading.Event, *, period: float = 5.0) -> None:
        """On the elected controller: keep every copy in flight running."""
        while not stop.wait(period):
            if self._is_leader():
                try:
                    self.resume()
                except errors.VirtvolError as e:
                    log.warning("reconcile: %s", e)

    def close(self) -> None:
        for vid in list(self._workers):
            with self._guard:
                w = self._workers.pop(vid, None)
            if w is not None:
                w[1].set()
                w[0].join(timeout=30)


def _arrays(parameters: Mapping[str, str]) -> list[str]:
    return [a.strip() for a in parameters.get("arrays", "").split(",") if a.strip()]


def _head(vol: VirtualVolume, size: int) -> VirtualVolume:
    """The first `size` bytes of `vol` (the part a copy fills; the rest is fresh)."""
    out: list[Extent] = []
    left = size
    for e in vol.extents:
        if left <= 0:
            break
        n = min(e.length, left)
        out.append(dataclasses.replace(e, length=n))
        left -= n
    return dataclasses.replace(vol, size=size, extents=tuple(out))


__all__ = ["SnapshotService", "Progress", "SNAPSHOT_KEYS", "Ability"]
