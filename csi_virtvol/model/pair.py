"""Pairs: the seed's table 140.  One source, one or more copies, per-extent method."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from csi_virtvol.model.ids import PairId, VolumeId


class CopyMethod(enum.Enum):
    INTERNAL = "internal"  # the array copies inside itself (snapshot/clone/XCOPY)
    REMOTE = "remote"      # the source array pushes to the target array
    HOST = "host"          # the host reads and writes (the seed's volume multiplexing program)


class PairState(enum.Enum):
    COPYING = "copying"
    SPLIT = "split"          # a frozen point-in-time image
    PAIRED = "paired"        # kept in sync
    RESYNCING = "resyncing"
    FAILED = "failed"


class ExtentCopyState(enum.Enum):
    PENDING = "pending"
    COPYING = "copying"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtentCopy:
    index: int
    method: CopyMethod
    state: ExtentCopyState
    bytes_total: int
    bytes_done: int = 0
    bytes_written: int = 0  # what the last host copy or resync really wrote (holes and equal data skipped)
    message: str = ""
    source_lun: str = ""  # "array:lun" the piece is read from (seed table 140: the pair's source)
    verify_method: str = ""  # how a host-copied extent was checked before done (services/verify.py)
    verify_result: str = ""  # "match", or what did not match


@dataclass(frozen=True, slots=True, kw_only=True)
class PairTarget:
    volume: VolumeId
    state: PairState
    extents: tuple[ExtentCopy, ...]
    started_at: float = 0.0
    ended_at: float = 0.0
    reason: str = ""

    @property
    def bytes_total(self) -> int:
        return sum(e.bytes_total for e in self.extents)

    @property
    def bytes_done(self) -> int:
        return sum(e.bytes_done for e in self.extents)


class Fence(enum.Enum):
    """How the source is kept still while its point-in-time image is cut.

    PROHIBITED: the source is published nowhere; its LUNs are access-prohibited
    (seed [0046]) until the copy ends, so ControllerPublish waits.
    FREEZE_REQUESTED -> FROZEN -> RELEASED: the source is in use on
    `fence_node`; that node's plugin holds its writes (fsfreeze) while the
    image is cut, and lets them go when the controller says RELEASED.  The
    controller no longer asks for it (group snapshots did, before they were cut
    live); nodes still answer it, and FROZEN is what a node that cannot cut
    answers a CUT_REQUESTED.
    CUT_REQUESTED -> [CUT_HELD ->] CUT -> RELEASED: a live cut (services/cut.py): the
    node holds the writes only for the instant, makes a copy-before-write cut named
    `cut_id` and answers with its frozen view (`cut_view`); CUT_HELD keeps the writes held
    until the controller says CUT (clones, or other volumes, cut at the same instant).
    A node that cannot cut answers FROZEN instead (the FREEZE protocol).
    PROHIBITED -> CUT_ON_STAGE -> CUT_HELD -> CUT -> RELEASED: a source published while a
    copy reads its LUNs (ControllerPublish does not wait for the copy): `fence_node` cuts it
    when it stages it, before anything writes it, and answers CUT_HELD with the view, which is
    then the untouched source; the controller moves the copy onto the view and answers CUT,
    and only then does the node let the volume be used.
    """

    NONE = "none"
    PROHIBITED = "prohibited"
    FREEZE_REQUESTED = "freeze-requested"
    FROZEN = "frozen"
    RELEASED = "released"
    REFUSED = "refused"
    CUT_REQUESTED = "cut-requested"
    CUT_HELD = "cut-held"
    CUT = "cut"
    CUT_ON_STAGE = "cut-on-stage"


@dataclass(frozen=True, slots=True, kw_only=True)
class Pair:
    id: PairId
    source: VolumeId
    targets: tuple[PairTarget, ...]
    fence: Fence = Fence.NONE
    fence_node: str = ""
    fence_message: str = ""
    cut_at: float = 0.0  # when the point-in-time image was fixed (0: not yet)
    cut_id: str = ""     # the live cut the node made for this pair (services/cut.py)
    cut_hold: bool = False   # the node keeps the writes held after the cut, until CUT
    cut_view: str = ""   # the cut's frozen view on fence_node (a file read at volume offsets)
    cut_time: float = 0.0    # the instant of the cut, by the node's clock
    since_cut: str = ""  # the cut whose change tracking a resync copies from
    cut_changed: str = ""    # on fence_node: the bitmap of what was written between since_cut and cut_id

    @property
    def state(self) -> PairState:
        states = {t.state for t in self.targets}
        for s in (PairState.FAILED, PairState.COPYING, PairState.RESYNCING, PairState.PAIRED):
            if s in states:
                return s
        return PairState.SPLIT
