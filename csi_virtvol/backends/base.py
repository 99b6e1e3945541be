"""The ArrayDriver protocol and its optional ability protocols.

As in NetApp Trident's storage drivers, the mandatory surface is small and
every extra ability is its own protocol.  A driver *implementing* a protocol
says it has the code path; whether the array really can (this filesystem has
reflink, this LUN has 3PC, ...) is the probed `Ability` flag in `describe()`.
The core asks `require_*`, which checks both.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from csi_virtvol import errors
from csi_virtvol.model.array import Ability, ArrayInfo, ArraySpec, CopyCost, Lun
from csi_virtvol.model.ids import ArrayId, LunId


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyProgress:
    bytes_total: int
    bytes_done: int
    done: bool
    error: str = ""


@runtime_checkable
class ArrayDriver(Protocol):
    """Every array: LUN lifecycle and how hosts reach a LUN."""

    @property
    def spec(self) -> ArraySpec: ...

    def describe(self) -> ArrayInfo:
        """Identity, *probed* abilities, capacity.  `abilities` here equals the
        probe; the registry applies the vendor table and admin override."""

    def create_lun(self, *, name: str, size: int) -> Lun:
        """Provision a LUN.  Same name and size: return the existing one (idempotent).
        Same name, other size: errors.AlreadyExists.  No room: errors.CapacityExceeded."""

    def delete_lun(self, *, lun_id: LunId) -> None:
        """Free a LUN; a missing LUN is not an error."""

    def get_lun(self, *, lun_id: LunId) -> Lun | None: ...

    def list_luns(self) -> list[Lun]:
        """Every LUN on the array, including ones the driver did not create."""

    def resize_lun(self, *, lun_id: LunId, size: int) -> Lun:
        """Grow a LUN (never shrink: errors.InvalidRequest).  Arrays that
        cannot grow raise errors.UnsupportedCapability."""

    def wipe_lun(self, *, lun_id: LunId) -> None:
        """Make a LUN read back as zeros (before a discovered LUN is reused)."""

    def open_path(self, *, lun_id: LunId) -> str:
        """A local path through which this host reads and writes the LUN
        (a regular file or a block device).  Used by host copy and the node."""


@runtime_checkable
class InternalCopyCapable(Protocol):
    """Seed 320: the array copies a LUN to another LUN of itself, at once."""

    def copy_lun_internal(self, *, source: LunId, name: str) -> Lun:
        """A new LUN `name` holding the point-in-time content of `source`.
        Idempotent by name."""

    def internal_copy_cost(self, *, source: LunId) -> CopyCost:
        """What `copy_lun_internal(source=...)` would take from this array now, and
        whether it fits, without making anything.  errors.NotFound without `source`."""


@runtime_checkable
class RemoteCopyCapable(Protocol):
    """Seed 330: the array pushes a LUN to a LUN of another array."""

    def can_reach(self, *, target: ArrayInfo) -> bool: ...

    def start_remote_copy(self, *, source: LunId, target_address: str, job: str,
                          since: str = "") -> None:
        """Push `source` into the LUN at `target_address` (same size); idempotent by `job`.
        `since` names a `DirtyTrackingCapable` tracking of `source`: copy only what
        was written since it started or since the last successful copy with it."""

    def remote_copy_progress(self, *, job: str) -> CopyProgress: ...

    def cancel_remote_copy(self, *, job: str) -> None: ...


@runtime_checkable
class DirtyTrackingCapable(Protocol):
    """Changed-block tracking, for differential resync and SnapshotMetadata."""

    def start_tracking(self, *, lun_id: LunId, name: str) -> None: ...

    def changed_ranges(self, *, lun_id: LunId, name: str) -> Iterator[tuple[int, int]]: ...

    def stop_tracking(self, *, lun_id: LunId, name: str) -> None: ...


@runtime_checkable
class AllocationMapCapable(Protocol):
    """Which parts of a LUN hold data (for SnapshotMetadata's allocated blocks).
    A driver without it: every byte of a LUN counts as allocated."""

    def allocated_ranges(self, *, lun_id: LunId, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of the data ranges of the LUN inside the window
        [offset, offset + length), in order, clipped to the window; holes
        (which read back as zeros) are left out."""


@runtime_checkable
class HostAccessCapable(Protocol):
    """Arrays that fence LUNs per host (a SAN target's ACL): ControllerPublish
    grants the node's initiator, ControllerUnpublish revokes it."""

    def grant_access(self, *, lun_id: LunId, initiator: str) -> None:
        """Let `initiator` (e.g. an iSCSI IQN) reach the LUN; idempotent."""

    def revoke_access(self, *, lun_id: LunId, initiator: str) -> None:
        """Take the LUN away from `initiator`; idempotent (a missing LUN too)."""


def same_or_conflict(array: ArrayId, existing: Lun, *, size: int) -> Lun:
    """create_lun's idempotency rule: the same name and size is the same LUN."""
    if existing.size != size:
        raise errors.AlreadyExists(
            f"array {array}: LUN {existing.id} exists with {existing.size} bytes, not {size}")
    return existing


def require_internal_copy(driver: ArrayDriver, abilities: Ability) -> InternalCopyCapable:
    if Ability.INTERNAL_COPY in abilities and isinstance(driver, InternalCopyCapable):
        return driver
    raise errors.UnsupportedCapability(f"array {driver.spec.id} cannot copy internally")


def require_remote_copy(driver: ArrayDriver, abilities: Ability) -> RemoteCopyCapable:
    if Ability.REMOTE_COPY in abilities and isinstance(driver, RemoteCopyCapable):
        return driver
    raise errors.UnsupportedCapability(f"array {driver.spec.id} cannot copy remotely")


def require_dirty_tracking(driver: ArrayDriver, abilities: Ability) -> DirtyTrackingCapable:
    if Ability.DIRTY_TRACKING in abilities and isinstance(driver, DirtyTrackingCapable):
        return driver
    raise errors.UnsupportedCapability(f"array {driver.spec.id} does not track changes")


def implemented_abilities(driver: object) -> Ability:
    """The abilities whose protocol the driver's class implements."""
    out = Ability.NONE
    if isinstance(driver, InternalCopyCapable):
        out |= Ability.INTERNAL_COPY
    if isinstance(driver, RemoteCopyCapable):
        out |= Ability.REMOTE_COPY
    if isinstance(driver, DirtyTrackingCapable):
        out |= Ability.DIRTY_TRACKING
    return out


__all__ = ["ArrayDriver", "InternalCopyCapable", "RemoteCopyCapable", "DirtyTrackingCapable",
           "AllocationMapCapable",
           "CopyProgress", "CopyCost", "require_internal_copy", "require_remote_copy", "require_dirty_tracking",
           "implemented_abilities", "ArrayId"]
