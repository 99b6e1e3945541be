"""The live cut between the controller and the node that serves a source (seed [0081]-[0083]).

A snapshot or clone of a published volume is cut in one instant on the node that has it
staged, by the node's composition (node/cut.py: copy-before-write in the FUSE daemon).
The writes wait only for that instant; the host copy then reads the cut's frozen view on
that node while the application carries on.  Coordination is through the pair record
(model.pair.Fence), like the freeze protocol it replaces for published sources:

    controller                        node (CutKeeper, run by the FenceKeeper)
    CUT_REQUESTED, cut_id, cut_hold
                                      freeze (fsfreeze / the daemon's write hold), cut,
                                      thaw unless cut_hold; answer CUT_HELD or CUT with
                                      cut_view and cut_time.  A composition that cannot
                                      cut answers FROZEN (writes held for the whole copy).
    [clones; CUT]                     CUT_HELD -> CUT: let the writes go
    host copies read cut_view         CUT: watch the cut; its store full, or the cut gone
                                      -> REFUSED with the reason
    RELEASED (done, failed, deleted)  end the cut: drop the view and its store
    (pair gone)                       end the cut, drop its tracking

The node keeps the cut's change tracking (a bitmap of the chunks written since the cut)
after the copy, for the pair's next resync (`since_cut`); it drops it with the pair.

cut_at_one_instant() is the one entry point: a snapshot cuts one member, a group
snapshot several (hold all, cut all, release all).  What must be of the instant and is not
the node's cut is made while the writes are held (`while_held`): internal clones, and the
starts of remote copies (an array's own copy of a LUN is point-in-time from the moment it
starts, qsd's blockdev-backup by copy-before-write; started later, it would hold writes made
after the cut).  A remote copy of a source cut live is therefore never pushed again: its
LUNs have moved on (`luns_still`).

A source published while a copy reads its LUNs directly (fence PROHIBITED: it was published
nowhere at the cut) is not held back for the copy (services/publish.py calls
publish_mid_copy):

    controller (ControllerPublish)    node (NodeStage, cut_for_stage)
    PROHIBITED -> CUT_ON_STAGE,
    fence_node, cut_id; LUNs usable
                                      device assembled, nothing written yet: cut it, answer
                                      CUT_HELD with the view (the untouched source); wait
    worker: stop the copies reading
    the LUNs (checkpoints kept), CUT;
    resume them from the view         CUT: mount, use.  Writes reach the LUNs only now.

The node waits STAGE_WAIT for the controller's CUT, then answers "try again" (ABORTED), its
cut kept for the retry: the volume is never written while a copy reads its LUNs.

Crashes (tests/integration/test_live_crash.py kills each process at each step): the node
plugin marks a volume whose writes it holds (Stager.begin_cut) and lets them go when it
starts again; a cut made but never answered is made again; a held cut whose pair moved on
(a restarted controller asked anew) is let go; a dead daemon's cuts are ended on disk.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from csi_virtvol import errors, failpoints
from csi_virtvol.config import parse_size
from csi_virtvol.model.ids import PairId
from csi_virtvol.model.pair import Fence, Pair, PairState
from csi_virtvol.node import stager as node_stager
from csi_virtvol.node.cut import CutView
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)

CUT_WAIT = 30.0          # seconds the controller waits for the nodes to cut
HELD_MAX = 20.0          # seconds a node keeps writes held for a CUT_HELD the controller forgets
STAGE_WAIT = 15.0        # seconds NodeStage waits for the controller to move a copy onto its cut
POLL = 0.02
STORE_KEY = "cutStoreSize"   # snapshot/StorageClass parameter: the copy-on-write store's limit
STORE_FRACTION = 0.25        # default limit: this share of the volume ...
STORE_MIN = 64 << 20         # ... but at least this
STORE_RESERVE = 0.05         # and never more than the node's state filesystem has free, less this share

LIVE = (Fence.CUT_REQUESTED, Fence.CUT_HELD, Fence.CUT, Fence.CUT_ON_STAGE)
"""Fences of a pair whose source a live cut is (being) made of."""
COPYING = (PairState.COPYING, PairState.RESYNCING)


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    pair: PairId
    node: str    # the node where the pair's source is staged; "" when nothing writes the source
    # (its LUNs access-prohibited, or a snapshot): there is nothing to hold, any instant is its own


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A pair ready to be cut (services/snapshots.py made its fresh target LUNs and fenced an
    unpublished source): `at_instant` makes what must be of the cut's instant, with the writes
    held (the clones of a source in use, and the starts of its remote copies); None: nothing."""
    member: Member
    at_instant: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Points:
    """The failpoints of a cut's steps: every hold asked for; every source held."""
    requested: str = "cut-requested"
    held: str = "cut-answered"


ONE = Points()


def new_cut_id(pair_id: str) -> str:
    return f"{pair_id}.{time.time_ns() // 1000:x}"


def pair_of(cut_id: str) -> str:
    return cut_id.rpartition(".")[0]


# -- the controller's side ----------------------------------------------------------------

def _update(store: StateStore, pair_id: str, change: Callable[[Pair], Pair]) -> Pair:
    for _ in range(50):
        rec = store.get(S.PAIRS, pair_id)
        if rec is None:
            raise errors.NotFound(f"pair {pair_id} does not exist")
        new = change(rec.value)
        if new == rec.value:
            return new
        try:
            store.update(S.PAIRS, new, revision=rec.revision)
            return new
        except errors.Conflict:
            continue
    raise errors.Conflict(f"pair {pair_id} kept changing underneath")


def cut_at_one_instant(store: StateStore, members: Sequence[Member], *,
                       while_held: Callable[[], None] | None = None,
                       timeout: float = CUT_WAIT, points: Points = ONE) -> list[Pair]:
    """Cut the sources of `members` at one instant: hold the writes of every source in use
    (a member with a `node`) and cut it, call `while_held` (make what must belong to the same
    instant: internal clones, remote copy starts, the images of members nothing writes), then
    let all writes go.  One source in use and no `while_held`: its node lets the writes go
    right after its cut.

    Returns the pairs, each source in use with fence CUT (its `cut_view` is the frozen view on
    its node) or FROZEN (that node cannot cut: it holds the writes until the pair is RELEASED);
    the others as they are.  On any failure every member's cut is undone (fence RELEASED) and
    the error raised: PreconditionFailed when a node refused (the reason in the message),
    OperationPending when a node did not answer within `timeout`.
    """
    if not members:
        raise errors.InvalidRequest("a cut needs at least one volume")
    if len({m.pair for m in members}) != len(members):
        raise errors.InvalidRequest("a pair appears twice in one cut")
    live = [m for m in members if m.node]
    hold = while_held is not None or len(live) > 1
    want = Fence.CUT_HELD if hold else Fence.CUT
    try:
        for m in live:
            request = _requester(cut_id=new_cut_id(m.pair), node=m.node, hold=hold)
            _update(store, m.pair, request)
        failpoints.hit(points.requested)
        pairs = {m.pair: _await(store, m.pair, want, timeout) for m in live}
        failpoints.hit(points.held)
        if while_held is not None:
            started = time.monotonic()
            while_held()
            failpoints.hit("cut-clones-made")
            log.info("made what belongs to the instant in %.3fs, writes held", time.monotonic() - started)
        for m in live:
            if pairs[m.pair].fence is Fence.CUT_HELD:
                pairs[m.pair] = _update(store, m.pair, lambda p: dataclasses.replace(p, fence=Fence.CUT))
    except BaseException:
        abort(store, [m.pair for m in live])
        raise
    log.info("cut %s at one instant", ", ".join(str(m.pair) for m in members))
    return [pairs[m.pair] if m.node else _update(store, m.pair, lambda p: p) for m in members]


def _requester(*, cut_id: str, node: str, hold: bool) -> Callable[[Pair], Pair]:
    def request(p: Pair) -> Pair:
        return dataclasses.replace(p, fence=Fence.CUT_REQUESTED, fence_node=node, fence_message="", cut_id=cut_id,
                                   cut_hold=hold, cut_view="", cut_time=0.0, cut_changed="")
    return request


def _await(store: StateStore, pair_id: str, want: Fence, timeout: float) -> Pair:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = store.get(S.PAIRS, pair_id)
        if rec is None:
            raise errors.NotFound(f"pair {pair_id} vanished")
        p = rec.value
        if p.fence in (want, Fence.FROZEN):
            return p
        if p.fence is Fence.REFUSED:
            raise errors.PreconditionFailed(f"the node holding the source could not cut it: {p.fence_message}")
        time.sleep(POLL)
    raise errors.OperationPending(f"node did not cut the source of {pair_id} within {timeout:.0f}s; try again")


def abort(store: StateStore, pair_ids: Sequence[str]) -> None:
    """Undo the cuts of these pairs (the nodes drop them); best effort."""
    for pid in pair_ids:
        try:
            _update(store, pid, lambda p: dataclasses.replace(p, fence=Fence.RELEASED)
                    if p.fence in LIVE or p.fence is Fence.FROZEN else p)
        except errors.VirtvolError as e:
            log.warning("pair %s: could not undo its cut: %s", pid, e)


def check(store: StateStore, pair_id: str) -> None:
    """Raise when the node gave up the cut the copy of `pair_id` reads (its store filled)."""
    rec = store.get(S.PAIRS, pair_id)
    if rec is not None and rec.value.fence is Fence.REFUSED and rec.value.cut_id:
        raise errors.PreconditionFailed(rec.value.fence_message or "the node gave up the cut")


def publish_mid_copy(store: StateStore, source_id: str, *, node: str, readonly: bool) -> bool:
    """ControllerPublish of `source_id` to `node` while copies of it run: make each copy that
    reads the LUNs directly (PROHIBITED, or waiting for a cut on a node it was published to
    before) wait for a cut on `node` instead (CUT_ON_STAGE), so the volume can be used at once.
    Raises PreconditionFailed, changing nothing, when a copy reads a frozen view of it on
    another node (only that node may write it until the copy ends).  Returns whether a copy now
    waits for `node` to cut it (the caller then lets the LUNs be used)."""
    pairs = [r.value for r in store.find(S.PAIRS, index="source", value=source_id) if r.value.state in COPYING]
    if readonly:
        return False   # a read-only publish writes nothing: the copies may go on reading the LUNs
    for p in pairs:
        if p.fence in (Fence.CUT_REQUESTED, Fence.CUT_HELD, Fence.CUT, Fence.FREEZE_REQUESTED, Fence.FROZEN) \
                and p.fence_node and p.fence_node != node:
            raise errors.PreconditionFailed(
                f"the copy of {source_id} into {p.targets[0].volume} reads its image on node {p.fence_node}: "
                f"it can be published to {p.fence_node} now, to another node when that copy ends")
    waiting = False
    for p in pairs:
        if p.fence is Fence.CUT_ON_STAGE and p.fence_node == node:
            waiting = True
        elif p.fence in (Fence.PROHIBITED, Fence.CUT_ON_STAGE):
            cut_id = new_cut_id(p.id)

            def convert(q: Pair, cut_id: str = cut_id) -> Pair:
                if q.state not in COPYING or q.fence not in (Fence.PROHIBITED, Fence.CUT_ON_STAGE):
                    return q
                return dataclasses.replace(q, fence=Fence.CUT_ON_STAGE, fence_node=node, cut_id=cut_id,
                                           cut_hold=True, cut_view="", cut_time=0.0, cut_changed="",
                                           fence_message="")
            waiting = _update(store, p.id, convert).fence is Fence.CUT_ON_STAGE or waiting
            log.info("pair %s: %s published to %s mid-copy; the node cuts it when it stages it",
                     p.id, source_id, node)
    return waiting


def luns_still(pair: Pair, *, snapshot_source: bool) -> bool:
    """Whether the source's LUNs still hold the image of the pair's cut (nothing wrote them
    since), so an array may read them again to copy it (a remote copy pushed again): fenced
    (PROHIBITED; or published since, but not yet written: CUT_ON_STAGE, or cut at its stage
    and waiting for the copy to move onto its view), frozen for the whole copy (FROZEN), or a
    snapshot.  A source cut live is written from the instant on."""
    if pair.fence in (Fence.PROHIBITED, Fence.CUT_ON_STAGE, Fence.FROZEN) or awaits_switch(pair):
        return True
    return snapshot_source and pair.fence is Fence.NONE


def awaits_switch(pair: Pair) -> bool:
    """The node cut a source published mid-copy (publish_mid_copy) and waits for the copy to
    read its view instead of the LUNs before anything writes them."""
    return pair.fence is Fence.CUT_HELD and pair.cut_at > 0 and bool(pair.cut_view)


def let_go(store: StateStore, pair: Pair) -> Pair:
    """CUT_HELD -> CUT for the pair's present cut: the node lets the writes go."""
    return _update(store, pair.id, lambda p: dataclasses.replace(p, fence=Fence.CUT)
                   if p.fence is Fence.CUT_HELD and p.cut_id == pair.cut_id else p)


def source_for(pair: Pair, *, volume_offset: int) -> tuple[str, int, str, str] | None:
    """Where a host copy of `pair` reads a piece at `volume_offset` of the source: (path,
    offset, node, changed map) in the cut's frozen view, or None when the pair has no live
    cut.  The changed map (resyncs only, "" otherwise) marks the chunks written since the
    pair's last copy: the copy reads and writes only those."""
    if pair.fence in (Fence.CUT, Fence.CUT_HELD) and pair.cut_view:
        return pair.cut_view, volume_offset, pair.fence_node, pair.cut_changed
    return None


# -- the node's side ------------------------------------------------------------------------

def store_limit(*, size: int, parameters: Mapping[str, str], state_dir: str) -> int:
    """How large the cut's copy-on-write store may grow (see node/cow.py for where it is)."""
    given = parameters.get(STORE_KEY, "")
    if given:
        try:
            limit = parse_size(given)
        except (ValueError, errors.VirtvolError) as e:
            raise errors.InvalidRequest(f"{STORE_KEY}={given!r}: {e}") from e
    else:
        limit = max(STORE_MIN, int(size * STORE_FRACTION))
    st = os.statvfs(state_dir)
    free = st.f_bavail * st.f_frsize
    room = int(free - st.f_blocks * st.f_frsize * STORE_RESERVE)
    if room < limit:
        if given or room < STORE_MIN:
            raise errors.CapacityExceeded(
                f"the node's state filesystem ({state_dir}) has {max(room, 0) >> 20} MiB for a copy-on-write "
                f"store of {limit >> 20} MiB")
        limit = room
    return limit


class CutKeeper:
    """The node's side of the live cut (see the module's doc).  `fallback(pair)` is the
    freeze protocol, for a composition that cannot cut."""

    def __init__(self, *, node_id: str, store: StateStore, stager: node_stager.Stager, state_dir: str,
                 fallback: Callable[[Pair], None]) -> None:
        self._node = node_id
        self._store = store
        self._stager = stager
        self._state_dir = state_dir
        self._fallback = fallback
        self._held: dict[str, tuple[str, str, float]] = {}  # pair id -> (volume, cut id, since)
        self._staging: set[str] = set()                   # pairs a NodeStage of this process waits on
        self._known: dict[str, str] | None = None         # cut id -> volume (None: not looked yet)
        self._ended: set[str] = set()                     # cuts ended whose tracking stays

    def _answer(self, pair_id: str, cut_id: str, *, when: tuple[Fence, ...] = (), **fields: object) -> bool:
        """Write the node's answer about cut `cut_id`, unless the pair has moved on to another
        cut (a restarted controller asked again) or, with `when`, left those fences."""
        def change(p: Pair) -> Pair:
            if p.cut_id != cut_id or (when and p.fence not in when):
                return p
            return dataclasses.replace(p, **fields)  # type: ignore[arg-type]
        try:
            new = _update(self._store, pair_id, change)
        except errors.NotFound:
            return False
        return new.cut_id == cut_id and all(getattr(new, k) == v for k, v in fields.items())

    def _discover(self) -> dict[str, str]:
        """Every cut and tracking bitmap of the volumes staged here (after a restart)."""
        known: dict[str, str] = {}
        if not self._stager.can_cut:
            return known
        for rec in self._stager.list_staged():
            try:
                cuts, tracked = self._stager.cuts(rec.volume_id)
            except errors.VirtvolError:
                continue
            for c in (*cuts, *tracked):
                known[c] = rec.volume_id
        return known

    def scan(self, pairs: Mapping[str, Pair]) -> None:
        if self._known is None:
            for volume in self._stager.release_leftover_holds():
                log.warning("volume %s: let go the writes a killed node plugin held", volume)
            self._known = self._discover()
        self._let_go_stale(pairs)
        for pair in pairs.values():
            if pair.fence_node != self._node or not pair.cut_id:
                continue
            try:
                self._step(pair)
            except errors.OperationPending as e:  # a stage or unstage of the volume runs: next scan
                log.info("pair %s: cut %s: %s", pair.id, pair.cut_id, e)
            except errors.VirtvolError as e:
                log.warning("pair %s: cut %s: %s", pair.id, pair.cut_id, e)
                if pair.fence in LIVE:
                    self._give_up(pair, str(e))
        self._sweep(pairs)

    def _let_go_stale(self, pairs: Mapping[str, Pair]) -> None:
        """Writes held for a cut the pair no longer asks for (it is gone, asks for another cut
        after a controller restart, or gave up) go at once, not after HELD_MAX."""
        for pair_id, (volume, cut_id, _) in list(self._held.items()):
            p = pairs.get(pair_id)
            if p is not None and p.cut_id == cut_id and p.fence in (Fence.CUT_HELD, Fence.CUT):
                continue
            self._held.pop(pair_id, None)
            log.info("pair %s: letting go the writes of %s held for cut %s", pair_id, volume, cut_id)
            try:
                self._stager.release_cut(volume)
            except errors.VirtvolError as e:
                log.error("pair %s: could not let the writes of %s go: %s", pair_id, volume, e)

    def _step(self, pair: Pair) -> None:
        assert self._known is not None
        if pair.fence is Fence.CUT_REQUESTED:
            self._begin(pair, hold=pair.cut_hold)
        elif pair.fence is Fence.CUT_ON_STAGE:
            staged = self._stager.get(pair.source)
            if staged is not None and staged.phase == "staged":  # already in use here: a held cut
                self._begin(pair, hold=True)
            # else: its NodeStage cuts it before the first write (cut_for_stage)
        elif pair.fence is Fence.CUT_HELD:
            held = self._held.get(pair.id)
            if held is None:
                staged = self._stager.get(pair.source)
                if pair.id in self._staging or staged is None or staged.phase != "staged":
                    return  # cut by a NodeStage, which uses the volume only at CUT
                # this plugin restarted while holding: it cannot vouch for the instant
                self._stager.release_cut(pair.source)
                self._give_up(pair, "the node plugin restarted while it held the writes")
            elif time.monotonic() - held[2] > HELD_MAX:
                self._give_up(pair, f"the writes were held {HELD_MAX:.0f}s and the controller did not let go")
        elif pair.fence is Fence.CUT:
            if pair.id in self._held:
                since = self._held.pop(pair.id)[2]
                self._stager.release_cut(pair.source)
                log.info("pair %s: writes of %s let go, held %.3fs", pair.id, pair.source, time.monotonic() - since)
            view = self._stager.cut_status(pair.source, pair.cut_id)
            if pair.targets[0].bytes_done:
                failpoints.hit("cut-node-copying")
            if view is None:
                self._give_up(pair, f"the cut of {pair.source} is gone from node {self._node} "
                                    "(its concatenation was restarted or unstaged)")
            elif view.full:
                self._give_up(pair, f"the copy-on-write store of the cut filled up ({view.limit >> 20} MiB on "
                                    f"node {self._node}) before the copy ended: the source was written faster "
                                    f"than it was copied; raise {STORE_KEY} or snapshot it again")

    def _limit(self, pair: Pair, size: int) -> int:
        target = self._store.get(S.VOLUMES, pair.targets[0].volume)
        params = target.value.parameters if target is not None else {}
        return store_limit(size=size, parameters=params, state_dir=self._state_dir)

    def _begin(self, pair: Pair, *, hold: bool) -> None:
        assert self._known is not None
        staged = self._stager.get(pair.source)
        if staged is None or staged.phase != "staged":
            self._answer(pair.id, pair.cut_id, when=(pair.fence,), fence=Fence.REFUSED,
                         fence_message=f"volume {pair.source} is not staged on node {self._node}")
            return
        if not self._stager.can_cut:
            self._fallback(pair)
            return
        failpoints.hit("cut-node-begin")
        limit = self._limit(pair, staged.size)
        if self._stager.cut_status(pair.source, pair.cut_id) is not None:
            # made before this plugin was killed, never answered: its instant is unknown to the
            # controller (and writes held with it are gone), so it is made again, now
            log.warning("pair %s: cut %s of %s was made but never answered; making it again", pair.id,
                        pair.cut_id, pair.source)
            self._stager.end_cut(pair.source, pair.cut_id)
            self._stager.drop_tracking(pair.source, pair.cut_id)
        if hold:
            self._held[pair.id] = (pair.source, pair.cut_id, time.monotonic())
        try:
            view = self._stager.begin_cut(pair.source, pair.cut_id, store_limit=limit, hold=hold,
                                          since=pair.since_cut)
        except BaseException:
            if self._held.pop(pair.id, None) is not None:
                self._release_quietly(pair.id, pair.source)
            self._end(pair.cut_id, pair.source)  # whatever the failed cut left
            self._drop(pair.cut_id, pair.source)
            raise
        self._known[pair.cut_id] = pair.source
        log.info("pair %s: cut %s of %s (%s)%s", pair.id, pair.cut_id, pair.source, view.path,
                 ", writes held" if hold else "")
        answered = self._answer(pair.id, pair.cut_id, when=(pair.fence,),
                                fence=Fence.CUT_HELD if hold else Fence.CUT, cut_view=view.path,
                                cut_time=view.at or time.time(), cut_changed=view.changed, fence_message="")
        failpoints.hit("cut-node-answered")
        if not answered and self._held.pop(pair.id, None) is not None:
            self._release_quietly(pair.id, pair.source)  # the pair moved on meanwhile: _sweep ends the cut

    def cut_for_stage(self, volume_id: str, *, size: int, cut: Callable[[str, int], CutView],
                      wait: float = STAGE_WAIT) -> None:
        """NodeStage of `volume_id`, its device assembled and nothing written yet: cut it for
        every copy that reads its LUNs directly (CUT_ON_STAGE, publish_mid_copy) with `cut(cut
        id, store limit)`, answer CUT_HELD with the view, and return once the controller has
        moved each copy onto its view (CUT), or the copy ended.  Raises OperationPending after
        `wait` seconds (the cuts stay, for NodeStage's retry)."""
        mine = [r.value for r in self._store.find(S.PAIRS, index="source", value=volume_id)
                if r.value.fence_node == self._node and r.value.cut_id and r.value.state in COPYING
                and (r.value.fence is Fence.CUT_ON_STAGE
                     or r.value.fence is Fence.CUT_HELD and r.value.id not in self._held)]
        if not mine:
            return
        if not self._stager.can_cut:
            raise errors.PreconditionFailed(
                f"a copy of volume {volume_id} reads its LUNs, and this node's composition cannot cut it "
                "(no copy-before-write): it can be staged when the copy ends")
        self._staging.update(p.id for p in mine)
        try:
            for p in mine:
                if p.fence is not Fence.CUT_ON_STAGE:
                    continue  # cut by an earlier attempt at this stage
                view = cut(p.cut_id, self._limit(p, size))
                if self._known is not None:
                    self._known[p.cut_id] = volume_id
                self._answer(p.id, p.cut_id, when=(Fence.CUT_ON_STAGE,), fence=Fence.CUT_HELD, cut_view=view.path,
                             cut_time=view.at or time.time(), cut_changed=view.changed, fence_message="")
                log.info("pair %s: %s cut at its stage (%s); waiting for the copy to read it", p.id, volume_id,
                         view.path)
                failpoints.hit("cut-node-stage-cut")
            deadline = time.monotonic() + wait
            while True:
                waiting = [p for p in mine if self._still_held(p)]
                if not waiting:
                    return
                if time.monotonic() > deadline:
                    raise errors.OperationPending(
                        f"volume {volume_id} is cut for the copy into {waiting[0].targets[0].volume}, but the "
                        f"controller has not moved that copy onto the cut within {wait:.0f}s (is it running?); "
                        "try again")
                time.sleep(POLL * 5)
        finally:
            self._staging.difference_update(p.id for p in mine)

    def _still_held(self, pair: Pair) -> bool:
        rec = self._store.get(S.PAIRS, pair.id)
        return (rec is not None and rec.value.cut_id == pair.cut_id and rec.value.state in COPYING
                and rec.value.fence in (Fence.CUT_ON_STAGE, Fence.CUT_HELD))

    def _give_up(self, pair: Pair, reason: str) -> None:
        if self._held.pop(pair.id, None) is not None:
            self._release_quietly(pair.id, pair.source)
        self._end(pair.cut_id, pair.source)
        log.warning("pair %s: giving up cut %s: %s", pair.id, pair.cut_id, reason)
        self._answer(pair.id, pair.cut_id, fence=Fence.REFUSED, fence_message=reason)

    def _release_quietly(self, pair_id: str, volume: str) -> None:
        try:
            self._stager.release_cut(volume)
        except errors.VirtvolError as e:
            log.error("pair %s: could not let the writes of %s go: %s", pair_id, volume, e)

    def _end(self, cut_id: str, volume: str) -> None:
        try:
            self._stager.end_cut(volume, cut_id)
        except errors.VirtvolError as e:
            log.warning("cut %s of %s: could not end it: %s", cut_id, volume, e)

    def _drop(self, cut_id: str, volume: str) -> None:
        try:
            self._stager.drop_tracking(volume, cut_id)
        except errors.VirtvolError as e:
            log.warning("cut %s of %s: could not drop its tracking: %s", cut_id, volume, e)

    def _sweep(self, pairs: Mapping[str, Pair]) -> None:
        """End the cuts no pair reads any more; drop the tracking no pair will resync from."""
        assert self._known is not None
        for cut_id, volume in list(self._known.items()):
            pair = pairs.get(pair_of(cut_id))
            standing = pair is not None and pair.cut_id == cut_id and pair.fence in LIVE
            tracked = pair is not None and cut_id in (pair.cut_id, pair.since_cut)
            if standing and tracked:
                continue
            if self._stager.get(volume) is None:
                self._known.pop(cut_id, None)   # unstaged: the workdir and all in it are gone
                self._ended.discard(cut_id)
                continue
            try:
                if not standing and cut_id not in self._ended:
                    failpoints.hit("cut-node-ending")
                    self._stager.end_cut(volume, cut_id)
                    self._ended.add(cut_id)
                if not tracked:
                    self._stager.drop_tracking(volume, cut_id)
                    self._known.pop(cut_id, None)
                    self._ended.discard(cut_id)
            except errors.VirtvolError as e:
                log.warning("cut %s of %s: could not clean it up: %s", cut_id, volume, e)

    def sweep(self, pairs: Mapping[str, Pair]) -> None:
        """End the cuts no pair reads any more, now (a scan does it too, after its steps)."""
        if self._known is not None:
            self._sweep(pairs)

    def release_all(self) -> None:
        """On the way out: let every held write go."""
        for pair_id, (volume, _, _) in list(self._held.items()):
            self._held.pop(pair_id, None)
            self._release_quietly(pair_id, volume)


__all__ = ["Member", "Prepared", "Points", "cut_at_one_instant", "luns_still", "abort", "check", "source_for", "CutKeeper", "LIVE", "STORE_KEY",
           "store_limit", "publish_mid_copy", "awaits_switch", "let_go", "STAGE_WAIT"]
