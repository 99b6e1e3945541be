"""The dm live cut at the node layer (node/dmcut.py): dm-snapshot and dm-era under a staged
volume, inside vmtest (this host has no device-mapper; test_dmcut_vm.py boots the VM).

A node plugin killed at any step of a cut (SIGKILL at a failpoint, in a child process that
stands for the plugin) leaves the application's writes flowing once a plugin starts again,
every acknowledged byte in place, the cut either standing and still frozen or undone, and
nothing (dm device, loop device, file) after the unstage.  Also: a held cut holds the writes
until release, growing keeps the cut and the tracking, unstaging ends a cut that stands.
"""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_virtvol.node import devices, dmcut, dmioctl
from csi_virtvol.node.cut import CHUNK
from csi_virtvol.node.layout import BackingExtent
from csi_virtvol.node.stager import Stager

from blockio import write_at as write
from lvmvg import IN_VM, MiB

NOT_IN_VM = "needs device-mapper: runs inside vmtest (tests/vm/test_dmcut_vm.py starts it)"
pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.skipif(not IN_VM, reason=NOT_IN_VM)]

SIZE = 32 * MiB
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Vol:
    root: Path
    state: str
    lun: Path
    staging: str
    name: str
    data: bytes          # what the volume holds (acknowledged)

    def extents(self, size: int = SIZE) -> list[BackingExtent]:
        return [BackingExtent(path=str(self.lun), offset=0, length=size)]


def stage(root: Path, name: str) -> Vol:
    lun = root / f"{name}.img"
    with open(lun, "wb") as f:
        f.truncate(2 * SIZE)
    v = Vol(root=root, state=str(root / "state"), lun=lun, staging=str(root / f"staging-{name}"), name=name,
            data=os.urandom(SIZE))
    rec = Stager(v.state, composer="dm").stage(name, v.extents(), v.staging, access="block")
    write(rec.device, 0, v.data)
    return v


def read(path: str, offset: int, length: int) -> bytes:
    """Bytes of a block device, read past the page cache (O_DIRECT into an aligned buffer)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    m = mmap.mmap(-1, length)
    try:
        n = os.preadv(fd, [m], offset)
        return bytes(m[:n])
    finally:
        m.close()
        os.close(fd)


def leftovers(v: Vol) -> list[str]:
    n = dmcut.names(v.name)
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    devs = [f.split()[0] for f in out.splitlines()
            if f.split() and (f.split()[0] == n.top or f.split()[0].startswith(n.prefix))]
    loops = [f"{lo.name} on {lo.back_file}" for lo in devices.list_loops() if lo.back_file.startswith(str(v.root))]
    files = [str(p) for p in Path(v.state, "volumes").glob("*")]
    return devs + loops + files


def suspended(v: Vol) -> list[str]:
    n = dmcut.names(v.name)
    found = []
    for dev in (n.top, n.era, n.real):
        info = dmioctl.info(dev)
        if info is not None and info.suspended:
            found.append(dev)
    return found


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Vol]:
    v = stage(tmp_path, "v")
    yield v
    try:
        Stager(v.state, composer="dm").unstage(v.name, v.staging)
    finally:
        for lo in devices.list_loops():
            if lo.back_file.startswith(str(tmp_path)):
                devices.detach(lo.name)


# -- a plugin killed at each step -------------------------------------------------------------

CHILD = r"""
import sys
from csi_virtvol.node.layout import BackingExtent
from csi_virtvol.node.stager import Stager
state, lun, size, action, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
st = Stager(state, composer="dm")
st.begin_cut("v", "p.1", store_limit=8 << 20, hold=hold)
if action == "end":
    st.end_cut("v", "p.1")
elif action == "drop":
    st.end_cut("v", "p.1")
    st.drop_tracking("v", "p.1")
elif action == "grow":
    st.expand("v", [BackingExtent(path=lun, offset=0, length=2 * size)])
print("the failpoint was not reached")
"""

# (failpoint, what the killed process was doing, held cut, whether the cut stands afterwards)
STEPS = [
    ("dmcut-stack-meta", "cut", False, False),      # the tracking half made
    ("dmcut-stack-era", "cut", False, False),
    ("dmcut-cut-recorded", "cut", False, False),
    ("dmcut-loaded", "cut", False, False),          # tables loaded, nothing swapped in
    ("dmcut-suspended", "cut", False, False),       # the writes held by a dead process
    ("dmcut-activated", "cut", False, False),       # the view live, the volume still suspended
    ("dmcut-made", "cut", True, False),             # held: its instant cannot be shared any more
    ("dmcut-made", "cut", False, True),             # made and let go: it stands, still frozen
    ("dmcut-ending", "end", False, False),
    ("dmcut-collapse", "drop", False, False),
    ("dmcut-grow-suspended", "grow", False, True),  # the volume, its tracking and its LUNs suspended
]


@pytest.mark.parametrize("failpoint,action,hold,stands", STEPS,
                         ids=[f"{s[0]}-{s[1]}{'-held' if s[2] else ''}" for s in STEPS])
def test_a_plugin_killed_at_each_step_of_a_cut_leaves_the_volume_whole_and_nothing_behind(
        vol: Vol, failpoint: str, action: str, hold: bool, stands: bool) -> None:
    env = {**os.environ, "VIRTVOL_FAILPOINTS": failpoint}
    res = subprocess.run([sys.executable, "-c", CHILD, vol.state, str(vol.lun), str(SIZE), action, "1" if hold else "0"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, f"not killed at {failpoint}: rc={res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    # the plugin starts again: whatever the killed one held is let go at once
    st = Stager(vol.state, composer="dm")
    assert not suspended(vol), "the volume's writes are still held after the plugin started again"
    rec = st.get("v")
    assert rec is not None
    after = os.urandom(2 * CHUNK)
    write(rec.device, 5 * CHUNK, after)
    image = read(rec.device, 0, SIZE)
    assert image == vol.data[:5 * CHUNK] + after + vol.data[7 * CHUNK:], "acknowledged bytes were lost or changed"
    standing, _ = st.cuts("v")
    if stands:
        assert standing == ["p.1"]
        view = st.cut_status("v", "p.1")
        assert view is not None and not view.full
        assert read(view.path, 0, SIZE) == vol.data, "the cut that survived the crash is not the image at the cut"
    else:
        assert standing == []
    st.unstage("v", vol.staging)
    assert leftovers(vol) == []


# -- holds, growth, unstaging -----------------------------------------------------------------------

def test_a_held_cut_of_two_volumes_holds_their_writes_until_release(tmp_path: Path) -> None:
    a, b = stage(tmp_path, "a"), stage(tmp_path, "b")
    st = Stager(a.state, composer="dm")
    dev_a, dev_b = st.get("a").device, st.get("b").device  # type: ignore[union-attr]
    try:
        va = st.begin_cut("a", "g.a", store_limit=8 << 20, hold=True)
        vb = st.begin_cut("b", "g.b", store_limit=8 << 20, hold=True)
        done = threading.Event()
        t = threading.Thread(target=lambda: (write(dev_a, 0, b"x" * CHUNK), done.set()), daemon=True)
        t.start()
        assert not done.wait(1.0), "a write went through while the cut held the writes"
        st.release_cut("a")
        st.release_cut("b")
        assert done.wait(30), "the write still waits after the release"
        write(dev_b, 0, b"y" * CHUNK)
        assert read(va.path, 0, SIZE) == a.data and read(vb.path, 0, SIZE) == b.data
        assert st.cuts("a") == (["g.a"], ["g.a"])
    finally:
        st.unstage("a", a.staging)
        st.unstage("b", b.staging)
    assert leftovers(a) == [] and leftovers(b) == []


def test_growing_keeps_the_standing_cut_and_the_tracking(vol: Vol) -> None:
    st = Stager(vol.state, composer="dm")
    dev = st.get("v").device  # type: ignore[union-attr]
    st.begin_cut("v", "p.1", store_limit=8 << 20)
    write(dev, 3 * CHUNK, b"a" * 100)
    view = st.begin_cut("v", "p.2", store_limit=8 << 20, since="p.1")
    with open(view.changed, "rb") as f:
        assert f.read()[0] == 1 << 3, "the chunks written between the two cuts"
    st.end_cut("v", "p.1")
    write(dev, 10 * CHUNK, b"b" * 100)
    assert st.expand("v", vol.extents(2 * SIZE)) == 2 * SIZE
    write(dev, SIZE + 2 * CHUNK, b"c" * 100)
    cut = st.cut_status("v", "p.2")
    assert cut is not None and cut.size == SIZE
    image = read(cut.path, 0, SIZE)
    assert image[:3 * CHUNK] == vol.data[:3 * CHUNK] and image[3 * CHUNK:3 * CHUNK + 100] == b"a" * 100
    assert image[10 * CHUNK:10 * CHUNK + 100] == vol.data[10 * CHUNK:10 * CHUNK + 100], "the cut thawed"
    changed = st.changed_since("v", "p.2")
    assert changed.size == 2 * SIZE
    assert changed.regions() == [(10 * CHUNK, CHUNK), (SIZE + 2 * CHUNK, CHUNK)]
    st.end_cut("v", "p.2")
    st.drop_tracking("v", "p.1")
    st.drop_tracking("v", "p.2")
    n = dmcut.names("v")
    assert [r[2] for r in dmioctl.table(n.top)] == ["linear", "linear"], "the volume went back to its LUNs"
    assert dmioctl.info(n.era) is None and dmioctl.info(n.real) is None
    assert not list(Path(vol.state, "volumes").glob("*/dmcut")), "its state and files are gone"
    assert read(dev, SIZE + 2 * CHUNK, 4096)[:100] == b"c" * 100


def test_unstaging_ends_a_standing_cut_even_while_it_is_read(vol: Vol) -> None:
    st = Stager(vol.state, composer="dm")
    view = st.begin_cut("v", "p.1", store_limit=8 << 20)
    reader = os.open(view.path, os.O_RDONLY | os.O_DIRECT)   # as the copy engine reads it
    buf = mmap.mmap(-1, CHUNK)
    try:
        assert os.preadv(reader, [buf], 0) == CHUNK and buf[:] == vol.data[:CHUNK]
        st.unstage("v", vol.staging)
        with pytest.raises(OSError):
            os.preadv(reader, [buf], CHUNK)   # the copy reading it fails: its pair fails cleanly
    finally:
        buf.close()
        os.close(reader)
    deadline = time.monotonic() + 10
    while leftovers(vol) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(vol) == []
