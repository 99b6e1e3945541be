"""What the internal copies of a copy would cost, asked of the arrays before anything is made.

A reflink clone, a thin snapshot or an array's full internal copy is not free
space-wise: the file pool promises a clone the source's unwritten part, a qsd
or LIO array copies the whole LUN.  The planner (`copy.planner.place_targets`)
takes these costs and sends an internal copy that cannot fit to the next
method (remote, then host copy) onto an array with room, so a copy is never
made, refused at the cut, undone and planned the same way again.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from csi_virtvol import errors
from csi_virtvol.backends.base import InternalCopyCapable
from csi_virtvol.model.array import Ability, CopyCost, lun_key
from csi_virtvol.model.ids import ArrayId
from csi_virtvol.model.volume import VirtualVolume
from csi_virtvol.services.arrays import ArrayPool

log = logging.getLogger(__name__)

# an array that cannot say what a copy costs is not asked to make one
UNKNOWN = CopyCost(needs=1, room=0, takes=0)


def clone_costs(arrays: ArrayPool, source: VirtualVolume, *,
                abilities: Mapping[ArrayId, Ability]) -> dict[str, CopyCost]:
    """The cost of an internal copy of each distinct source LUN on an array that can
    copy internally, by LUN key (`planner.place_targets`'s `clone_costs`)."""
    out: dict[str, CopyCost] = {}
    for e in source.extents:
        key = lun_key(e.array, e.lun)
        if key in out or Ability.INTERNAL_COPY not in abilities.get(e.array, Ability.NONE):
            continue
        try:
            driver = arrays.driver(e.array)
        except errors.NotFound:
            continue
        if not isinstance(driver, InternalCopyCapable):
            continue
        try:
            out[key] = driver.internal_copy_cost(source=e.lun)
        except errors.VirtvolError as err:
            log.warning("array %s: cannot tell what a copy of %s costs (%s); copying it another way",
                        e.array, e.lun, err)
            out[key] = UNKNOWN
    return out


def describe_declined(declined: Mapping[str, CopyCost]) -> str:
    """One line for the log and the CopyStarted event: which clones did not fit."""
    return "; ".join(f"an internal copy of {k} needs {c.needs} bytes, its array has {c.room}"
                     for k, c in sorted(declined.items()))


__all__ = ["clone_costs", "describe_declined", "UNKNOWN"]
