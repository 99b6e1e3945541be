"""How a volume's extents become one block device: the interface and the choice.

Two compositions implement it: concat.FuseComposer (a userspace concatenation daemon and
a loop device on its file; for hosts without device-mapper) and dmcut.DmCutComposer
(device-mapper linear over loop devices, dm.py, with live cuts and change tracking from
dm-snapshot and dm-era, dmcut.py).  Each keeps what it needs to find its pieces
again in the `workdir` it is given, so it can be torn down after the plugin restarts.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from csi_virtvol import errors
from csi_virtvol.node.layout import BackingExtent

Kind = Literal["auto", "fuse", "dm"]

DM_CONTROL = "/dev/mapper/control"


class Composer(Protocol):
    kind: str

    def assemble(
        self, *, workdir: str, name: str, extents: Sequence[BackingExtent], readonly: bool
    ) -> str:
        """The block device for the extents; idempotent.  Extents that extend what is
        already assembled grow it online (see grow)."""
        ...

    def grow(self, *, workdir: str, name: str, extents: Sequence[BackingExtent]) -> str:
        """Grow an assembled device to `extents` (its old extents plus more) online."""
        ...

    def teardown(self, *, workdir: str, name: str) -> None:
        """Remove the device and everything under it; what is already gone is fine."""
        ...

    def device(self, *, workdir: str, name: str) -> str | None:
        """The assembled device, or None."""
        ...

    def problem(self, *, workdir: str, name: str) -> str | None:
        """Why the assembled device is unhealthy, or None when it is fine."""
        ...


@runtime_checkable
class Settles(Protocol):
    """A composition whose pieces a killed process can leave half-changed (dm: a device
    left suspended in the middle of a cut holds the application's writes)."""

    def settle(self, *, workdir: str, name: str) -> None:
        """Finish or undo what a killed process left, and let held writes go."""
        ...


@runtime_checkable
class Retirable(Protocol):
    """A composition that can take a volume's device away while its cuts (node/cut.py) stand,
    so an unstage does not end the cut a copy still reads; teardown() ends the rest."""

    def retire(self, *, workdir: str, name: str) -> None: ...


def _has_dm() -> bool:
    """Whether the kernel answers on /dev/mapper/control: the node may exist (dmsetup makes
    it) where the kernel has no device-mapper, and then opening it fails with ENODEV."""
    try:
        fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def resolve_kind(kind: Kind = "auto") -> Literal["fuse", "dm"]:
    if kind == "auto":
        return "dm" if _has_dm() else "fuse"
    if kind not in ("fuse", "dm"):
        raise errors.InvalidRequest(f"unknown composer {kind!r}")
    return kind


def make(kind: Kind = "auto") -> Composer:
    from csi_virtvol.node import concat, dmcut

    if resolve_kind(kind) == "dm":
        return dmcut.DmCutComposer()
    return concat.FuseComposer()
