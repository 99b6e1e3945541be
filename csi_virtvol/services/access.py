"""Per-host LUN access on arrays that fence LUNs by initiator (a SAN target's ACL).

ControllerPublish grants the node's initiator every LUN of the volume on such an
array, ControllerUnpublish revokes it, and a published volume that grows grants
the new LUNs too.  Arrays that do not fence (file pools, qsd, LVM) are skipped.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from csi_virtvol import errors
from csi_virtvol.backends.base import HostAccessCapable
from csi_virtvol.model.ids import ArrayId, LunId
from csi_virtvol.model.volume import Extent
from csi_virtvol.services.arrays import ArrayPool
from csi_virtvol.store import base as S
from csi_virtvol.store.base import StateStore

log = logging.getLogger(__name__)


def _fenced(arrays: ArrayPool, extents: Iterable[Extent]) -> list[tuple[HostAccessCapable, ArrayId, LunId]]:
    out: list[tuple[HostAccessCapable, ArrayId, LunId]] = []
    seen: set[tuple[ArrayId, LunId]] = set()
    for e in extents:
        if (e.array, e.lun) in seen:
            continue
        seen.add((e.array, e.lun))
        driver = arrays.driver(e.array)
        if isinstance(driver, HostAccessCapable):
            out.append((driver, e.array, e.lun))
    return out


def initiator_of(store: StateStore, node_id: str) -> str:
    rec = store.get(S.NODES, node_id)
    return rec.value.initiator if rec is not None else ""


def grant(arrays: ArrayPool, store: StateStore, *, node_id: str, extents: Iterable[Extent]) -> None:
    """Let `node_id` reach every fenced LUN of `extents`; all or nothing."""
    fenced = _fenced(arrays, extents)
    if not fenced:
        return
    initiator = initiator_of(store, node_id)
    if not initiator:
        raise errors.PreconditionFailed(
            f"node {node_id} announced no iSCSI initiator name, so array {fenced[0][1]} cannot "
            "let it in (is open-iscsi installed on the node?)")
    done: list[tuple[HostAccessCapable, ArrayId, LunId]] = []
    try:
        for driver, array, lun in fenced:
            driver.grant_access(lun_id=lun, initiator=initiator)
            done.append((driver, array, lun))
    except BaseException:
        for driver, array, lun in done:
            try:
                driver.revoke_access(lun_id=lun, initiator=initiator)
            except errors.VirtvolError as e:
                log.warning("could not take back %s/%s from %s: %s", array, lun, initiator, e)
        raise
    log.info("node %s (%s) may reach %d LUN(s)", node_id, initiator, len(done))


def revoke(arrays: ArrayPool, store: StateStore, *, node_id: str, extents: Iterable[Extent]) -> None:
    fenced = _fenced(arrays, extents)
    initiator = initiator_of(store, node_id)
    if not fenced or not initiator:
        return
    for driver, _, lun in fenced:
        driver.revoke_access(lun_id=lun, initiator=initiator)
    log.info("node %s (%s) no longer reaches %d LUN(s)", node_id, initiator, len(fenced))


__all__ = ["grant", "revoke", "initiator_of"]
