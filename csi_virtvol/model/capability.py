"""Volume capabilities (access type and mode) as the driver understands them, and the
spec's rules for publishing one volume several times (CSI v1.12, NodePublishVolume and
ControllerPublishVolume)."""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from csi_virtvol import errors


class AccessMode(enum.Enum):
    """CSI VolumeCapability.AccessMode.Mode, by number."""

    UNKNOWN = 0
    SINGLE_NODE_WRITER = 1
    SINGLE_NODE_READER_ONLY = 2
    MULTI_NODE_READER_ONLY = 3
    MULTI_NODE_SINGLE_WRITER = 4
    MULTI_NODE_MULTI_WRITER = 5
    SINGLE_NODE_SINGLE_WRITER = 6
    SINGLE_NODE_MULTI_WRITER = 7

    @property
    def multi_node(self) -> bool:
        return self in (AccessMode.MULTI_NODE_READER_ONLY, AccessMode.MULTI_NODE_SINGLE_WRITER,
                        AccessMode.MULTI_NODE_MULTI_WRITER)

    @property
    def read_only(self) -> bool:
        return self in (AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY)

    @property
    def several_targets(self) -> bool:
        """May the volume be published at more than one target path of a node?  The spec's
        second table (this driver advertises SINGLE_NODE_MULTI_WRITER): the MULTI_NODE modes
        and SINGLE_NODE_MULTI_WRITER may; SINGLE_NODE_SINGLE_WRITER and the other
        non-MULTI_NODE modes (SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY) may not."""
        return self.multi_node or self is AccessMode.SINGLE_NODE_MULTI_WRITER


class AccessType(enum.Enum):
    BLOCK = "block"
    MOUNT = "mount"


SUPPORTED_FS = ("ext4", "xfs")


@dataclass(frozen=True, slots=True, kw_only=True)
class Capability:
    access_type: AccessType
    access_mode: AccessMode
    fs_type: str = ""
    mount_flags: tuple[str, ...] = field(default_factory=tuple)
    mount_group: str = ""


def unsupported_reason(cap: Capability) -> str:
    """Why the driver cannot honour `cap`, or "" when it can."""
    if cap.access_mode is AccessMode.UNKNOWN:
        return "access mode UNKNOWN is not supported"
    if cap.access_mode in (AccessMode.MULTI_NODE_SINGLE_WRITER, AccessMode.MULTI_NODE_MULTI_WRITER):
        # Several nodes writing one LUN set through node-local caches would corrupt it.
        return f"access mode {cap.access_mode.name} is not supported: one writer node at a time"
    if cap.access_type is AccessType.MOUNT and cap.fs_type and cap.fs_type not in SUPPORTED_FS:
        return f"filesystem {cap.fs_type!r} is not supported; use one of {', '.join(SUPPORTED_FS)}"
    return ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    """One NodePublishVolume of a volume on this node, as the CO asked for it (the `P` of the
    spec's table: every argument but the secrets; the staging path is the volume's one)."""

    target: str
    access_type: AccessType
    access_mode: AccessMode
    readonly: bool  # the request's flag; the mount is read-only too when the mode is a reader's
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    mount_group: str = ""

    def describe(self) -> str:
        ro = "readonly" if self.readonly else "read-write"
        extra = f", flags {','.join(self.mount_flags)}" if self.mount_flags else ""
        return f"{self.access_type.value} {self.access_mode.name} {ro}{extra}"


def check_node_publish(volume_id: str, existing: Sequence[Publication], new: Publication) -> bool:
    """The spec's second NodePublishVolume table, for `new` against the publications of the
    volume in effect on this node.  True: `new` is already in effect (idempotent, OK).
    False: go ahead.  Raises AlreadyExists (same target, other arguments) or
    PreconditionFailed (a second target the mode does not allow, or another capability)."""
    for old in existing:
        if old.target == new.target:
            if old == new:
                return True
            raise errors.AlreadyExists(
                f"volume {volume_id} is already published at {new.target} as {old.describe()}, "
                f"not {new.describe()}")
    others = [p for p in existing if p.target != new.target]
    if not others:
        return False
    old = others[0]
    if (old.access_type, old.access_mode) != (new.access_type, new.access_mode):
        raise errors.PreconditionFailed(
            f"volume {volume_id} is published at {old.target} as {old.access_type.value} "
            f"{old.access_mode.name}; a second publish may not change the volume capability "
            f"(asked: {new.access_type.value} {new.access_mode.name})")
    if not new.access_mode.several_targets:
        raise errors.PreconditionFailed(
            f"volume {volume_id} is published at {old.target}; access mode {new.access_mode.name} "
            "allows one target path on a node (SINGLE_NODE_MULTI_WRITER or a MULTI_NODE mode allows more)")
    return False
