"""What the node is given (BackingExtent) and the table the concatenation daemon serves.

A BackingExtent is a run of a LUN as this node sees it: a path (a LUN file or a block
device), a byte offset in it and a length.  A volume is the ordered concatenation of its
extents.  The table is written as JSON so the daemon (another process) can read it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from csi_virtvol import errors

SECTOR = 512
CONCAT_FILE_NAME = "volume"  # the one file the concatenation daemon serves
CONCAT_CTL_NAME = ".ctl"     # its control file (live cuts)
CONCAT_CUT_PREFIX = "cut-"   # its frozen views: cut-<cut id>


@dataclass(frozen=True, slots=True, kw_only=True)
class BackingExtent:
    path: str    # a LUN file or a block device on this node
    offset: int  # byte offset inside path
    length: int  # bytes this extent adds to the volume

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "offset": self.offset, "length": self.length}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackingExtent:
        return cls(path=str(d["path"]), offset=int(d["offset"]), length=int(d["length"]))


def total_size(extents: Iterable[BackingExtent]) -> int:
    return sum(e.length for e in extents)


def validate(extents: Sequence[BackingExtent], *, check_paths: bool = True) -> None:
    """Reject what no composition can serve: no extents, unaligned or negative runs,
    missing paths, runs past the end of their LUN."""
    if not extents:
        raise errors.InvalidRequest("a volume needs at least one extent")
    for i, e in enumerate(extents):
        if not e.path:
            raise errors.InvalidRequest(f"extent {i}: empty path")
        if e.offset < 0 or e.length <= 0:
            raise errors.InvalidRequest(f"extent {i}: offset {e.offset} length {e.length}")
        if e.offset % SECTOR or e.length % SECTOR:
            raise errors.InvalidRequest(
                f"extent {i}: offset {e.offset} and length {e.length} must be multiples of {SECTOR}"
            )
        if check_paths:
            size = backing_size(e.path)
            if e.offset + e.length > size:
                raise errors.OutOfRange(
                    f"extent {i}: {e.path} has {size} bytes, extent ends at {e.offset + e.length}"
                )


def backing_size(path: str) -> int:
    """Bytes in a LUN file or block device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise errors.NotFound(f"backing path {path} does not exist") from e
    except OSError as e:
        raise errors.BackendError(f"cannot open {path}: {e}") from e
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def is_extension(old: Sequence[BackingExtent], new: Sequence[BackingExtent]) -> bool:
    """True when every byte of `old` keeps its place in `new`: the old extents are a
    prefix of the new ones, the last of them possibly grown in place."""
    if len(new) < len(old) or not old:
        return False
    for a, b in zip(old[:-1], new):
        if a != b:
            return False
    a, b = old[-1], new[len(old) - 1]
    return a.path == b.path and a.offset == b.offset and b.length >= a.length


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    """The concatenation daemon's input."""

    extents: tuple[BackingExtent, ...]
    readonly: bool = False

    @property
    def size(self) -> int:
        return total_size(self.extents)

    def to_dict(self) -> dict[str, Any]:
        return {"extents": [e.to_dict() for e in self.extents], "readonly": self.readonly}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Table:
        return cls(
            extents=tuple(BackingExtent.from_dict(x) for x in d["extents"]),
            readonly=bool(d.get("readonly", False)),
        )

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> Table:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def write_json_atomic(path: str, data: Any) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
