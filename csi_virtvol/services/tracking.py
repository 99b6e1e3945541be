"""Changed-block tracking for pairs whose pieces are pushed by remote copy.

A pair's remote-copied pieces are tracked on their source LUN (a dirty bitmap
named after the pair) from the cut on, so a resync pushes only what was written
since (`start_remote_copy(since=...)`), and a pair that dissolves stops its
tracking.  Arrays without DIRTY_TRACKING are simply copied whole again.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from csi_virtvol import errors
from csi_virtvol.backends.base import DirtyTrackingCapable, require_dirty_tracking
from csi_virtvol.model.array import Ability
from csi_virtvol.model.ids import ArrayId, LunId
from csi_virtvol.model.pair import CopyMethod, ExtentCopy, Pair
from csi_virtvol.services.arrays import ArrayPool

log = logging.getLogger(__name__)


def name_for(pair_id: str) -> str:
    return f"pair-{pair_id}"


def _split(key: str) -> tuple[ArrayId, LunId]:
    array, _, lun = key.partition(":")
    return ArrayId(array), LunId(lun)


def tracker(arrays: ArrayPool, array: ArrayId) -> DirtyTrackingCapable | None:
    try:
        info = arrays.info(array, fresh=False)
        if Ability.DIRTY_TRACKING not in info.abilities:
            return None
        return require_dirty_tracking(arrays.driver(array), info.abilities)
    except errors.VirtvolError:
        return None


def remote_sources(rows: Iterable[ExtentCopy]) -> list[str]:
    return sorted({r.source_lun for r in rows if r.method is CopyMethod.REMOTE and r.source_lun})


def start(arrays: ArrayPool, pair: Pair) -> None:
    """Track every remote-copied source LUN of `pair` (idempotent; call while fenced)."""
    for key in remote_sources(pair.targets[0].extents):
        array, lun = _split(key)
        t = tracker(arrays, array)
        if t is not None:
            t.start_tracking(lun_id=lun, name=name_for(pair.id))


def stop(arrays: ArrayPool, pair: Pair) -> None:
    """Best effort: the pair dissolves; its source LUNs may already be gone."""
    for key in remote_sources(pair.targets[0].extents):
        array, lun = _split(key)
        t = tracker(arrays, array)
        if t is None:
            continue
        try:
            t.stop_tracking(lun_id=lun, name=name_for(pair.id))
        except errors.VirtvolError as e:
            log.warning("pair %s: could not stop tracking %s: %s", pair.id, key, e)


__all__ = ["name_for", "start", "stop", "tracker", "remote_sources"]
