#!/usr/bin/env python3
"""How long a dm live cut holds the application's writes (node/dmcut.py), inside vmtest.

The hold is from the suspend of the volume's device to its resume (dmcut logs it).  For
each variant, REPEAT cuts of a staged 256 MiB volume (Stager, composer dm), one after the
other, each ended before the next:

  raw block, ioctls          what the driver does: suspend/resume through node/dmioctl
  raw block, dmsetup         baseline: the same three steps as `dmsetup suspend/resume` runs
  ext4, 96 MiB dirty, syncfs what the driver does: the mounted filesystem written back first
  ext4, 96 MiB dirty, none   baseline: the freeze inside the hold writes the dirty data back

This host has no device-mapper, so it runs in the VM (software emulation: absolute times
are 10-50x a real machine's; the ratios are what to quote):

  /work/shared/vmtest/vmtest --udev --mem 3G -- .venv/bin/python bench/bench_dmcut_hold.py
"""
from __future__ import annotations

import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_facts  # noqa: E402

from csi_virtvol.node import dmcut, dmioctl  # noqa: E402
from csi_virtvol.node.layout import BackingExtent  # noqa: E402
from csi_virtvol.node.stager import Stager  # noqa: E402

MiB = 1 << 20
SIZE = 256 * MiB
DIRTY = 96 * MiB
REPEAT = 5
HELD = re.compile(r"with the writes held ([\d.]+) ms")


class Holds(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ms: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = HELD.search(record.getMessage())
        if m:
            self.ms.append(float(m.group(1)))


@contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def dmsetup_suspend(name: str, *, lockfs: bool) -> None:
    subprocess.run(["dmsetup", "suspend", *([] if lockfs else ["--nolockfs"]), name], check=True)


def dmsetup_resume(name: str) -> None:
    subprocess.run(["dmsetup", "resume", name], check=True)


def run(root: Path, access: str, before: Callable[[Path], None]) -> list[float]:
    lun = root / "lun.img"
    with open(lun, "wb") as f:
        f.truncate(SIZE)
    st = Stager(str(root / "state"), composer="dm")
    staging = root / "staging"
    st.stage("b", [BackingExtent(path=str(lun), offset=0, length=SIZE)], str(staging), access=access,  # type: ignore[arg-type]
             fs_type="ext4" if access == "mount" else "")
    h = Holds()
    logging.getLogger("csi_virtvol.node.dmcut").addHandler(h)
    try:
        for i in range(REPEAT):
            before(staging)
            st.begin_cut("b", f"bench.{i}", store_limit=SIZE)
            st.end_cut("b", f"bench.{i}")
    finally:
        logging.getLogger("csi_virtvol.node.dmcut").removeHandler(h)
        st.unstage("b", str(staging))
        lun.unlink()
    return h.ms


def nothing(_: Path) -> None:
    pass


def dirty(staging: Path) -> None:
    with open(staging / "dirty", "wb") as f:   # written, not synced
        f.write(os.urandom(DIRTY))


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("csi_virtvol.node.dmcut").setLevel(logging.INFO)
    if not os.environ.get("VMTEST_GUEST"):
        print("run this inside vmtest (see its doc)", file=sys.stderr)
        return 2
    print("\n".join(machine_facts()))
    print(f"\nvolume {SIZE >> 20} MiB, {REPEAT} cuts per variant, software-emulated VM\n")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        rows.append(("raw block, ioctls (driver)", run(root, "block", nothing)))
        with patched(dmioctl, "suspend", dmsetup_suspend), patched(dmioctl, "resume", dmsetup_resume):
            rows.append(("raw block, dmsetup runs (baseline)", run(root, "block", nothing)))
        rows.append((f"ext4, {DIRTY >> 20} MiB dirty, syncfs first (driver)", run(root, "mount", dirty)))
        with patched(dmcut, "_presync", lambda top: None):
            rows.append((f"ext4, {DIRTY >> 20} MiB dirty, no syncfs (baseline)", run(root, "mount", dirty)))
    print("| variant | hold median | hold max |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {statistics.median(ms):.1f} ms | {max(ms):.1f} ms |")
    print(f"\nratios: ioctls / dmsetup {statistics.median(rows[0][1]) / statistics.median(rows[1][1]):.2f}x, "
          f"syncfs / none {statistics.median(rows[2][1]) / statistics.median(rows[3][1]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
