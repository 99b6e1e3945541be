"""Volume capabilities (access type and mode) as the driver understands them."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
