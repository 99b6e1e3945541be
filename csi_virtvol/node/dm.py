"""Device-mapper composition: a linear table whose segments are loop devices (LUN files)
or ranges of block devices.

Each segment is a run of one backing path.  Growing appends segments: a new extent gets
its own, and a last extent grown in place gets one more segment for the added range, so
loop devices never need their size limit changed.  The segments are kept in
workdir/segments.json so teardown finds every loop device after a plugin restart.
Expanding: suspend, load the longer table, resume.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from csi_virtvol import errors
from csi_virtvol.node import commands, devices, layout
from csi_virtvol.node.layout import SECTOR, BackingExtent

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    path: str
    offset: int
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "offset": self.offset, "length": self.length}


def plan(extents: Sequence[BackingExtent], old: Sequence[Segment]) -> list[Segment]:
    """Segments covering extents in order, reusing `old` (which must cover a prefix)."""
    segs = list(old)
    j = 0
    for e in extents:
        cur, end = e.offset, e.offset + e.length
        while cur < end and j < len(segs):
            s = segs[j]
            if s.path != e.path or s.offset != cur or s.offset + s.length > end:
                raise errors.InvalidRequest(
                    "the new extents would move bytes already in place on the device"
                )
            cur += s.length
            j += 1
        if cur < end:
            if j != len(segs):
                raise errors.InvalidRequest("the new extents do not extend the assembled ones")
            segs.append(Segment(path=e.path, offset=cur, length=end - cur))
            j += 1
    if j != len(segs):
        raise errors.InvalidRequest("the new extents are shorter than the assembled ones")
    return segs


def dm_name(name: str) -> str:
    return "virtvol-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", name)[:100]


class DmComposer:
    kind = "dm"

    def assemble(
        self, *, workdir: str, name: str, extents: Sequence[BackingExtent], readonly: bool
    ) -> str:
        segs, table, wanted = self.linear_table(workdir=workdir, extents=extents, readonly=readonly)
        dmn = dm_name(name)
        if exists(dmn):
            if live_table(dmn) != wanted:
                commands.run(["dmsetup", "suspend", dmn])
                try:
                    commands.run(["dmsetup", "reload", dmn], input=table)
                finally:
                    commands.run(["dmsetup", "resume", dmn])
                logger.info("reloaded %s with %d segments", dmn, len(segs))
        else:
            argv = ["dmsetup", "create", dmn]
            if readonly:
                argv.append("--readonly")
            commands.run(argv, input=table)
            logger.info("created %s with %d segments", dmn, len(segs))
        return device_path(dmn)

    @staticmethod
    def linear_table(
        *, workdir: str, extents: Sequence[BackingExtent], readonly: bool
    ) -> tuple[list[Segment], str, list[list[str]]]:
        """Plan the segments of `extents` (recorded in workdir/segments.json first), attach
        their loop devices, and return (segments, the linear table, its rows as `dmsetup
        table` prints them)."""
        layout.validate(extents)
        os.makedirs(workdir, exist_ok=True)
        seg_file = os.path.join(workdir, "segments.json")
        old = load_segments(seg_file)
        segs = plan(extents, old)
        # Record first: a crash after attaching leaves loops that teardown still finds.
        layout.write_json_atomic(seg_file, {"segments": [s.to_dict() for s in segs],
                                            "readonly": readonly})
        lines: list[str] = []
        wanted: list[list[str]] = []
        start = 0
        for s in segs:
            if devices.is_block_device(s.path):
                dev, dev_off = s.path, s.offset
            else:
                dev = devices.attach(s.path, offset=s.offset, sizelimit=s.length,
                                     direct_io=True, readonly=readonly)
                dev_off = 0
            row = [str(start // SECTOR), str(s.length // SECTOR), "linear", dev, str(dev_off // SECTOR)]
            lines.append(" ".join(row))
            wanted.append(row[:3] + [majmin(dev)] + row[4:])
            start += s.length
        return segs, "\n".join(lines) + "\n", wanted

    def grow(self, *, workdir: str, name: str, extents: Sequence[BackingExtent]) -> str:
        seg_file = os.path.join(workdir, "segments.json")
        try:
            with open(seg_file, encoding="utf-8") as f:
                readonly = bool(json.load(f).get("readonly", False))
        except FileNotFoundError as e:
            raise errors.NotFound(f"volume {name} is not assembled") from e
        return self.assemble(workdir=workdir, name=name, extents=extents, readonly=readonly)

    def device(self, *, workdir: str, name: str) -> str | None:
        dmn = dm_name(name)
        return device_path(dmn) if exists(dmn) else None

    def teardown(self, *, workdir: str, name: str) -> None:
        dmn = dm_name(name)
        if exists(dmn):
            commands.run(["dmsetup", "remove", "--retry", dmn])
            logger.info("removed %s", dmn)
        for s in load_segments(os.path.join(workdir, "segments.json")):
            if devices.is_block_device(s.path):
                continue
            for ro in (False, True):
                lo = devices.find(s.path, offset=s.offset, sizelimit=s.length, readonly=ro)
                if lo is not None:
                    devices.detach(lo.name)

    def problem(self, *, workdir: str, name: str) -> str | None:
        dmn = dm_name(name)
        if not exists(dmn):
            return f"device-mapper device {dmn} is gone"
        info = commands.run(["dmsetup", "info", "-c", "--noheadings", "-o", "attr", dmn]).stdout
        if info.strip().startswith("s"):
            return f"{dmn} is suspended"
        for s in load_segments(os.path.join(workdir, "segments.json")):
            if devices.is_block_device(s.path):
                if not os.path.exists(s.path):
                    return f"backing device {s.path} is gone"
            elif devices.find(s.path, offset=s.offset, sizelimit=s.length) is None:
                return f"the loop device over {s.path}@{s.offset} is gone"
        return None


def load_segments(path: str) -> list[Segment]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    return [Segment(path=d["path"], offset=int(d["offset"]), length=int(d["length"]))
            for d in data.get("segments", [])]


def exists(dmn: str) -> bool:
    return commands.run(["dmsetup", "info", dmn], check=False).returncode == 0


def live_table(dmn: str) -> list[list[str]]:
    out = commands.run(["dmsetup", "table", dmn]).stdout
    rows = []
    for line in out.splitlines():
        if not line.strip():
            continue
        f = line.split()
        # dmsetup prints devices as major:minor; compare on the resolved form
        if len(f) >= 5 and f[2] == "linear":
            f[3] = majmin(f[3])
        rows.append(f)
    return rows


def majmin(dev: str) -> str:
    if ":" in dev and not dev.startswith("/"):
        return dev
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def device_path(dmn: str) -> str:
    path = f"/dev/mapper/{dmn}"
    if os.path.exists(path):
        return path
    out = commands.run(["dmsetup", "info", "-c", "--noheadings", "-o", "blkdevname", dmn]).stdout
    return "/dev/" + out.strip()
