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
snapshot several (hold all, cut all, release all).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.config import parse_size
from csi_virtvol.model.ids import PairId
from csi_virtvol.model.pair import Fence, Pair
from csi_virtvol.node import stager as node_stager
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)

CUT_WAIT = 30.0          # seconds the controller waits for the nodes to cut
HELD_MAX = 20.0          # seconds a node keeps writes held for a CUT_HELD the controller forgets
POLL = 0.02
STORE_KEY = "cutStoreSize"   # snapshot/StorageClass parameter: the copy-on-write store's limit
STORE_FRACTION = 0.25        # default limit: this share of the volume ...
STORE_MIN = 64 << 20         # ... but at least this
STORE_RESERVE = 0.05         # and never more than the node's state filesystem has free, less this share

LIVE = (Fence.CUT_REQUESTED, Fence.CUT_HELD, Fence.CUT)
"""Fences of a pair whose source a live cut is (being) made of."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    pair: PairId
    node: str    # the node where the pair's source is staged


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
                       timeout: float = CUT_WAIT) -> list[Pair]:
    """Cut the sources of `members` (each a pair whose source is staged on `node`) at one
    instant: hold every source's writes and cut it, call `while_held` (e.g. make internal
    clones that must belong to the same instant), then let all writes go.  One member and
    no `while_held`: the node lets the writes go right after its cut.

    Returns the pairs, each with fence CUT (its `cut_view` is the frozen view on its node)
    or FROZEN (that node cannot cut: it holds the writes until the pair is RELEASED).
    On any failure every member's cut is undone (fence RELEASED) and the error raised:
    PreconditionFailed when a node refused (the reason in the message), OperationPending
    when a node did not answer within `timeout`.
    """
    if not members:
        raise errors.InvalidRequest("a cut needs at least one volume")
    if len({m.pair for m in members}) != len(members):
        raise errors.InvalidRequest("a pair appears twice in one cut")
    for m in members:
        if not m.node:
            raise errors.InvalidRequest(f"pair {m.pair}: no node to cut its source on")
    hold = while_held is not None or len(members) > 1
    want = Fence.CUT_HELD if hold else Fence.CUT
    try:
        for m in members:
            request = _requester(cut_id=new_cut_id(m.pair), node=m.node, hold=hold)
            _update(store, m.pair, request)
        pairs = {m.pair: _await(store, m.pair, want, timeout) for m in members}
        if while_held is not None:
            while_held()
        for m in members:
            if pairs[m.pair].fence is Fence.CUT_HELD:
                pairs[m.pair] = _update(store, m.pair, lambda p: dataclasses.replace(p, fence=Fence.CUT))
    except BaseException:
        abort(store, [m.pair for m in members])
        raise
    log.info("cut %s at one instant", ", ".join(str(m.pair) for m in members))
    return [pairs[m.pair] for m in members]


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


def source_for(pair: Pair, *, volume_offset: int) -> tuple[str, int, str, str] | None:
    """Where a host copy of `pair` reads a piece at `volume_offset` of the source: (path,
    offset, node, changed map) in the cut's frozen view, or None when the pair has no live
    cut.  The changed map (resyncs only, "" otherwise) marks the chunks written since the
    pair's last copy: the copy reads and writes only those."""
    if pair.fence is Fence.CUT and pair.cut_view:
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
        self._held: dict[str, tuple[str, float]] = {}    # pair id -> (volume, since)
        self._known: dict[str, str] | None = None         # cut id -> volume (None: not looked yet)
        self._ended: set[str] = set()                     # cuts ended whose tracking stays

    def _answer(self, pair_id: str, **fields: object) -> None:
        try:
            _update(self._store, pair_id, lambda p: dataclasses.replace(p, **fields))  # type: ignore[arg-type]
        except errors.NotFound:
            pass

    def _discover(self) -> dict[str, str]:
        """Every cut and tracking bitmap of the volumes staged here (after a restart)."""
        known: dict[str, str] = {}
        if not self._stager.can_cut:
            return known
        for rec in self._stager.list_staged():
            if rec.phase != "staged":
                continue
            try:
                cuts, tracked = self._stager.cuts(rec.volume_id)
            except errors.VirtvolError:
                continue
            for c in (*cuts, *tracked):
                known[c] = rec.volume_id
        return known

    def scan(self, pairs: Mapping[str, Pair]) -> None:
        if self._known is None:
            self._known = self._discover()
        for pair in pairs.values():
            if pair.fence_node != self._node or not pair.cut_id:
                continue
            try:
                self._step(pair)
            except errors.VirtvolError as e:
                log.warning("pair %s: cut %s: %s", pair.id, pair.cut_id, e)
                if pair.fence in LIVE:
                    self._give_up(pair, str(e))
        self._sweep(pairs)

    def _step(self, pair: Pair) -> None:
        assert self._known is not None
        if pair.fence is Fence.CUT_REQUESTED:
            self._begin(pair)
        elif pair.fence is Fence.CUT_HELD:
            held = self._held.get(pair.id)
            if held is None:  # this plugin restarted while holding: it cannot vouch for the instant
                self._stager.release_cut(pair.source)
                self._give_up(pair, "the node plugin restarted while it held the writes")
            elif time.monotonic() - held[1] > HELD_MAX:
                self._give_up(pair, f"the writes were held {HELD_MAX:.0f}s and the controller did not let go")
        elif pair.fence is Fence.CUT:
            if pair.id in self._held:
                self._held.pop(pair.id)
                self._stager.release_cut(pair.source)
            view = self._stager.cut_status(pair.source, pair.cut_id)
            if view is None:
                self._give_up(pair, f"the cut of {pair.source} is gone from node {self._node} "
                                    "(its concatenation was restarted or unstaged)")
            elif view.full:
                self._give_up(pair, f"the copy-on-write store of the cut filled up ({view.limit >> 20} MiB on "
                                    f"node {self._node}) before the copy ended: the source was written faster "
                                    f"than it was copied; raise {STORE_KEY} or snapshot it again")

    def _begin(self, pair: Pair) -> None:
        assert self._known is not None
        staged = self._stager.get(pair.source)
        if staged is None or staged.phase != "staged":
            self._answer(pair.id, fence=Fence.REFUSED,
                         fence_message=f"volume {pair.source} is not staged on node {self._node}")
            return
        if not self._stager.can_cut:
            self._fallback(pair)
            return
        target = self._store.get(S.VOLUMES, pair.targets[0].volume)
        params = target.value.parameters if target is not None else {}
        limit = store_limit(size=staged.size, parameters=params, state_dir=self._state_dir)
        if pair.cut_hold:
            self._held[pair.id] = (pair.source, time.monotonic())
        try:
            view = self._stager.begin_cut(pair.source, pair.cut_id, store_limit=limit, hold=pair.cut_hold,
                                          since=pair.since_cut)
        except BaseException:
            self._held.pop(pair.id, None)
            raise
        self._known[pair.cut_id] = pair.source
        log.info("pair %s: cut %s of %s (%s)%s", pair.id, pair.cut_id, pair.source, view.path,
                 ", writes held" if pair.cut_hold else "")
        self._answer(pair.id, fence=Fence.CUT_HELD if pair.cut_hold else Fence.CUT, cut_view=view.path,
                     cut_time=view.at or time.time(), cut_changed=view.changed, fence_message="")

    def _give_up(self, pair: Pair, reason: str) -> None:
        if self._held.pop(pair.id, None) is not None:
            try:
                self._stager.release_cut(pair.source)
            except errors.VirtvolError as e:
                log.error("pair %s: could not let the writes of %s go: %s", pair.id, pair.source, e)
        self._end(pair.cut_id, pair.source)
        log.warning("pair %s: giving up cut %s: %s", pair.id, pair.cut_id, reason)
        self._answer(pair.id, fence=Fence.REFUSED, fence_message=reason)

    def _end(self, cut_id: str, volume: str) -> None:
        try:
            self._stager.end_cut(volume, cut_id)
        except errors.VirtvolError as e:
            log.warning("cut %s of %s: could not end it: %s", cut_id, volume, e)

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
                    self._stager.end_cut(volume, cut_id)
                    self._ended.add(cut_id)
                if not tracked:
                    self._stager.drop_tracking(volume, cut_id)
                    self._known.pop(cut_id, None)
                    self._ended.discard(cut_id)
            except errors.VirtvolError as e:
                log.warning("cut %s of %s: could not clean it up: %s", cut_id, volume, e)

    def release_all(self) -> None:
        """On the way out: let every held write go."""
        for pair_id, (volume, _) in list(self._held.items()):
            self._held.pop(pair_id, None)
            try:
                self._stager.release_cut(volume)
            except errors.VirtvolError as e:
                log.error("pair %s: could not let the writes of %s go: %s", pair_id, volume, e)


__all__ = ["Member", "cut_at_one_instant", "abort", "check", "source_for", "CutKeeper", "LIVE", "STORE_KEY",
           "store_limit"]
